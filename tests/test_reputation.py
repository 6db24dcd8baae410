"""Reputation is the operator's: the published formula, from what the operator saw."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpumesh.api.gpunode import GPUNodeStatus, Track
from gpumesh.operator.reputation import ReputationSettings, account, score, step
from gpumesh.operator.settings import OperatorSettings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WEEK = ReputationSettings.of(OperatorSettings())
HOUR = timedelta(hours=1)


def after(track: Track | None, health: str, hours: float) -> Track:
    base = track.updated_time if track else T0
    return account(track, health, base + timedelta(hours=hours), WEEK)


def test_a_new_node_starts_at_half_and_earns_the_rest() -> None:
    new = account(None, "Healthy", T0, WEEK)
    assert score(new, WEEK) == 0.5
    day = after(new, "Healthy", 24)
    assert score(day, WEEK) == pytest.approx((24 * 3600 + 1800) / (24 * 3600 + 3600), abs=0.01)
    assert score(after(day, "Healthy", 24 * 6), WEEK) >= 0.99


def test_downtime_costs_what_the_formula_says() -> None:
    up_day = after(account(None, "Healthy", T0, WEEK), "Lost", 24)  # up a day, then Lost
    down = after(up_day, "Lost", 6)
    keep = 0.5 ** (6 / (7 * 24))
    up, down_s = up_day.up_seconds * keep, 6 * 3600
    assert down.up_seconds == pytest.approx(up) and down.down_seconds == pytest.approx(down_s)
    expected = (up + 1800) / (up + down_s + 3600) * 0.95**down.faults
    assert score(down, WEEK) == round(expected, 2)
    assert score(down, WEEK) < score(up_day, WEEK)


def test_each_fall_into_a_fault_counts_once_and_fades() -> None:
    track = account(None, "Healthy", T0, WEEK)
    track = after(track, "NeedsReset", 1)
    track = after(track, "NeedsReset", 1)  # still the same fault
    assert track.faults == pytest.approx(1.0, rel=0.01)
    track = after(track, "Healthy", 1)
    track = after(track, "Unhealthy", 1)
    assert track.faults == pytest.approx(2.0, rel=0.02)
    assert after(track, "Healthy", 24 * 7).faults == pytest.approx(1.0, rel=0.05)


def test_the_operator_writes_only_when_something_changed_or_the_record_is_old() -> None:
    status = GPUNodeStatus(health="Healthy")
    first = step(status, T0, WEEK)
    assert first is not None and first["status"]["reputation"] == 0.5
    written = GPUNodeStatus.model_validate({"health": "Healthy", **first["status"]})
    assert step(written, T0 + timedelta(seconds=30), WEEK) is None
    assert step(written, T0 + WEEK.rewrite_after, WEEK) is not None
    lost = written.model_copy(update={"health": "Lost"})
    assert step(lost, T0 + timedelta(seconds=30), WEEK) is not None  # up -> down, at once


@given(
    st.lists(
        st.tuples(st.sampled_from(["Healthy", "Degraded", "Lost", "NeedsReset"]), st.floats(0, 48)),
        max_size=30,
    )
)
def test_reputation_stays_between_zero_and_one_whatever_happens(
    history: list[tuple[str, float]],
) -> None:
    track: Track | None = None
    for health, hours in history:
        track = after(track, health, hours)
        assert 0.0 <= score(track, WEEK) <= 1.0


def test_records_of_nodes_seen_together_come_due_spread_over_half_a_period() -> None:
    nodes = [f"s{i:02d}-h100-{j:02d}" for i in range(20) for j in range(50)]
    offsets = sorted(
        (WEEK.rewrite_after_for(n) - WEEK.rewrite_after) / WEEK.rewrite_after for n in nodes
    )
    assert offsets[0] >= 0 and offsets[-1] < 0.5
    # Spread evenly: no tenth of the half period holds more than twice its share.
    tenths = [int(o * 20) for o in offsets]
    assert max(tenths.count(k) for k in range(10)) < 2 * len(nodes) / 10
    assert WEEK.rewrite_after_for("n1") == WEEK.rewrite_after_for("n1")


def test_a_node_record_is_rewritten_on_its_own_period() -> None:
    # A prior so large that the reputation cannot move within the period: only age counts.
    slow = ReputationSettings(WEEK.half_life, prior_s=1e9, rewrite_after=timedelta(seconds=60))
    status = GPUNodeStatus(health="Healthy")
    first = step(status, T0, slow, "node-a")
    assert first is not None
    written = GPUNodeStatus.model_validate({"health": "Healthy", **first["status"]})
    due = T0 + slow.rewrite_after_for("node-a")
    assert due > T0 + slow.rewrite_after
    assert step(written, due - timedelta(seconds=1), slow, "node-a") is None
    assert step(written, due, slow, "node-a") is not None
