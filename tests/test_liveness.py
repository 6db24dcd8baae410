"""A GPUNode whose agent went quiet is Lost; one whose agent still reports is left alone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gpumesh.operator.liveness import lapses_at, lost_patch

RENEWED = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
T = RENEWED.timestamp()


def lease(renew: Any = "2026-11-27T12:00:00.000000Z", duration: Any = 40) -> dict[str, Any]:
    return {
        "metadata": {"name": "gpumesh-agent-n1", "namespace": "gpumesh-system"},
        "spec": {"renewTime": renew, "leaseDurationSeconds": duration},
    }


def test_a_lease_lapses_its_duration_after_its_last_renewal() -> None:
    assert lapses_at(lease()) == T + 40


def test_an_unreadable_lease_has_no_lapse_time() -> None:
    assert lapses_at(lease(renew="yesterday")) is None
    assert lapses_at(lease(duration=None)) is None
    assert lapses_at({"spec": {}}) is None


def test_a_running_lease_marks_nothing() -> None:
    assert lost_patch("Healthy", lease(), T + 39) is None


def test_a_lapsed_lease_marks_the_node_lost() -> None:
    assert lost_patch("Healthy", lease(), T + 41) == {"status": {"health": "Lost"}}
    assert lost_patch(None, lease(), T + 41) == {"status": {"health": "Lost"}}


def test_a_deleted_lease_marks_the_node_lost() -> None:
    assert lost_patch("Unhealthy", None, T) == {"status": {"health": "Lost"}}


def test_a_node_lost_already_is_not_written_again() -> None:
    assert lost_patch("Lost", lease(), T + 41) is None
    assert lost_patch("Lost", None, T) is None


def test_a_lease_we_cannot_read_marks_nothing() -> None:
    assert lost_patch("Healthy", lease(renew="yesterday"), T + 1000) is None
