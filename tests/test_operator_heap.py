"""The operator's garbage-collector settings: a larger young generation, and what was
listed at start frozen once (operator/heap.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gpumesh.operator import heap


@pytest.fixture
def collector() -> Iterator[None]:
    """Put the test process's collector back as it was."""
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    heap._frozen.clear()


def test_tune_makes_the_young_generation_larger_than_cpythons_default(collector: None) -> None:
    heap.tune()
    assert gc.get_threshold() == heap.THRESHOLDS
    assert heap.THRESHOLDS[0] > 700


def test_what_exists_when_the_listing_is_in_is_frozen_once(collector: None) -> None:
    listed = [{"metadata": {"name": f"node-{i}"}} for i in range(1000)]
    assert heap.freeze_listed() is True
    frozen = gc.get_freeze_count()
    assert frozen >= len(listed)
    assert not any(obj is listed[0] for obj in gc.get_objects())  # the collector skips it

    later = [{"metadata": {"name": f"cluster-{i}"}} for i in range(10)]
    assert heap.freeze_listed() is False
    assert gc.get_freeze_count() == frozen  # later objects stay with the collector
    assert any(obj is later[0] for obj in gc.get_objects())
