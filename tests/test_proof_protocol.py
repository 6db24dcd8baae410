"""The arithmetic of proof of GPU: exact products, SHA-256 over arrays, Merkle openings,
and what a cheater who computed only part of a product can hope for."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpumesh.api.proof import (
    Keys,
    Shape,
    check_opening,
    digest_hex,
    entry,
    open_leaf,
    product,
    sha256_64,
    tree,
)

SEED = "5e" * 32
KEYS = Keys.of(SEED, "node-a", "GPU-1")
SHAPE = Shape(32, 300, 32)


@given(st.lists(st.binary(min_size=64, max_size=64), min_size=1, max_size=40))
def test_array_sha256_is_sha256(messages: list[bytes]) -> None:
    words = np.frombuffer(b"".join(messages), dtype=">u4").astype(np.uint32).reshape(-1, 16)
    digests = sha256_64(np, words)
    assert [digest_hex(d) for d in digests] == [hashlib.sha256(m).hexdigest() for m in messages]


def test_the_product_is_exact_and_every_entry_can_be_recomputed_alone() -> None:
    c = product(np, KEYS, SHAPE, block_rows=7)
    rng = random.Random(1)
    for _ in range(50):
        row, col = rng.randrange(SHAPE.rows), rng.randrange(SHAPE.cols)
        assert int(c[row, col]) == entry(KEYS, SHAPE, row, col)
    assert np.abs(c).max() <= 4 * SHAPE.inner


def test_the_product_is_bound_to_the_seed_the_node_and_the_gpu() -> None:
    first = product(np, KEYS, SHAPE)
    for other in (
        Keys.of("6f" * 32, "node-a", "GPU-1"),
        Keys.of(SEED, "node-b", "GPU-1"),
        Keys.of(SEED, "node-a", "GPU-2"),
    ):
        assert (product(np, other, SHAPE) != first).mean() > 0.9


def test_shapes_that_would_not_make_a_full_tree_or_exact_sums_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Shape(3, 10, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        Shape(16, 10, 24)
    with pytest.raises(ValueError, match="inner"):
        Shape(16, 1 << 22, 16)


def test_an_honest_opening_checks_out_at_every_corner() -> None:
    c = product(np, KEYS, SHAPE)
    levels = tree(np, c, chunk=5)
    root = digest_hex(levels[-1][0])
    for row, col in [(0, 0), (0, 31), (31, 0), (31, 31), (17, 5)]:
        o = open_leaf(levels, c, SHAPE, row, col)
        assert len(o.path) == SHAPE.depth * 32
        assert check_opening(KEYS, SHAPE, root, row, col, o.leaf, o.path) is None


def test_a_changed_leaf_or_path_does_not_lead_to_the_root() -> None:
    c = product(np, KEYS, SHAPE)
    levels = tree(np, c)
    root = digest_hex(levels[-1][0])
    o = open_leaf(levels, c, SHAPE, 3, 4)
    forged = list(o.leaf)
    forged[4] += 1
    assert "does not lead to the committed root" in str(
        check_opening(KEYS, SHAPE, root, 3, 4, forged, o.path)
    )
    bent = bytes([o.path[0] ^ 1]) + o.path[1:]
    assert "does not lead" in str(check_opening(KEYS, SHAPE, root, 3, 4, o.leaf, bent))
    assert "digests" in str(check_opening(KEYS, SHAPE, root, 3, 4, o.leaf, o.path[:-32]))
    assert "outside" in str(check_opening(KEYS, SHAPE, root, 32, 0, o.leaf, o.path))


def test_a_consistent_tree_over_a_wrong_product_names_the_wrong_entry() -> None:
    c = product(np, KEYS, SHAPE) + np.int32(1)
    levels = tree(np, c)
    root = digest_hex(levels[-1][0])
    o = open_leaf(levels, c, SHAPE, 9, 2)
    want = entry(KEYS, SHAPE, 9, 2)
    assert check_opening(KEYS, SHAPE, root, 9, 2, o.leaf, o.path) == (
        f"entry (9, 2) is {want + 1}, not {want}"
    )


@settings(max_examples=60, deadline=None)
@given(
    honest_rows=st.sets(st.integers(0, 15)),
    samples=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), min_size=1, max_size=8),
)
def test_a_cheater_passes_a_sample_exactly_when_it_lands_on_a_row_it_computed(
    honest_rows: set[int], samples: list[tuple[int, int]]
) -> None:
    """Soundness of one sample. With k samples drawn uniformly and independently, a cheater
    who computed a share f of the rows therefore passes with probability f**k."""
    shape = Shape(16, 40, 16)
    c = product(np, KEYS, shape)
    for row in range(shape.rows):
        if row not in honest_rows:
            c[row] = np.int32(4 * shape.inner + 1)  # beyond any true entry: always wrong
    levels = tree(np, c)
    root = digest_hex(levels[-1][0])
    results = []
    for row, col in samples:
        o = open_leaf(levels, c, shape, row, col)
        results.append(check_opening(KEYS, shape, root, row, col, o.leaf, o.path) is None)
    assert results == [row in honest_rows for row, _ in samples]
