"""A GPUNode whose agent went quiet is Lost; one whose agent still renews is left alone.

Time is the operator's: deadlines run from when a renewal was seen, whatever the agent's
clock says, and a silence of most agents at once is not blamed on them.
"""

from __future__ import annotations

from typing import Any

from gpumesh.api.lease import lease_terms
from gpumesh.operator.liveness import AgentLiveness

T = 1_000_000.0
LOST = {"status": {"health": "Lost"}}


def lease(renew: Any = "2026-11-27T12:00:00.000000Z", duration: Any = 40) -> dict[str, Any]:
    return {"spec": {"renewTime": renew, "leaseDurationSeconds": duration}}


def watched(*nodes: str) -> AgentLiveness:
    live = AgentLiveness()
    for node in nodes:
        live.observe(node, lease(), T)
    return live


def test_the_deadline_runs_from_when_a_renewal_was_seen_not_from_the_agents_clock() -> None:
    live = AgentLiveness()
    # The agent's clock is a year behind ours: its renewal still counts from now.
    assert live.observe("n1", lease(renew="2025-11-27T12:00:00Z"), T) == T + 40
    assert live.verdict("n1", lease(renew="2025-11-27T12:00:00Z"), "Healthy", T + 39).patch is None


def test_seeing_the_same_renewal_again_does_not_push_the_deadline() -> None:
    live = watched("n1")
    assert live.observe("n1", lease(), T + 30) == T + 40  # a relist, not a renewal


def test_a_renewal_pushes_the_deadline() -> None:
    live = watched("n1")
    assert live.observe("n1", lease(renew="2026-11-27T12:00:10Z"), T + 10) == T + 50


def test_a_lease_not_renewed_within_its_duration_makes_the_node_lost() -> None:
    live = watched("n1", "n2", "n3", "n4")
    for other in ("n2", "n3", "n4"):
        live.observe(other, lease(renew="later"), T + 30)
    assert live.verdict("n1", lease(), "Healthy", T + 41).patch == LOST


def test_a_renewal_seen_only_on_the_re_read_keeps_the_node() -> None:
    live = watched("n1")
    verdict = live.verdict("n1", lease(renew="2026-11-27T12:00:35Z"), "Healthy", T + 41)
    assert verdict.patch is None
    assert verdict.recheck_at == T + 81


def test_a_deleted_lease_makes_the_node_lost_once_its_deadline_passed() -> None:
    live = watched("n1", "n2")
    assert live.verdict("n1", None, "Healthy", T + 10).patch is None
    assert live.verdict("n1", None, "Healthy", T + 41).patch == LOST


def test_a_node_lost_already_or_without_gpunode_is_not_written() -> None:
    live = watched("n1", "n2")
    assert live.verdict("n1", lease(), "Lost", T + 41).patch is None
    assert live.verdict("n1", lease(), None, T + 41).patch is None


def test_a_node_never_seen_with_a_lease_is_never_marked() -> None:
    assert AgentLiveness().verdict("n1", None, "Healthy", T + 1000).patch is None


def test_when_most_agents_fall_silent_at_once_none_is_marked() -> None:
    live = watched("n1", "n2", "n3", "n4", "n5", "n6")
    live.observe("n4", lease(renew="later"), T + 30)
    live.observe("n5", lease(renew="later"), T + 30)
    live.observe("n6", lease(renew="later"), T + 30)
    held = live.verdict("n1", lease(), "Healthy", T + 41)  # n1, n2, n3 silent: half
    assert held.patch is None and held.held_back
    assert held.recheck_at == T + 81
    live.observe("n2", lease(renew="later"), T + 42)  # n2 back: a third silent
    assert live.verdict("n1", lease(), "Healthy", T + 43).patch == LOST


def test_an_unreadable_lease_is_not_watched() -> None:
    assert lease_terms(lease(duration=None)) is None
    assert lease_terms(lease(duration=0)) is None
    assert AgentLiveness().observe("n1", lease(duration="40"), T) is None
