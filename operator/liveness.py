"""When a node agent goes quiet, its GPUNode is Lost. Pure: no Kubernetes imports.

Each agent renews a heartbeat Lease (``gpumesh-agent-<node>``: 40 s, renewed every 10 s).
Kubernetes marks a Node NotReady when its kubelet's Lease stops being renewed; gpumesh does
the same one level up. When an agent's Lease has not been renewed for its duration (or is
deleted and not back within it) while its GPUNode says anything but Lost, the operator
writes ``status.health`` Lost. Placement then takes no new work there, and workers leave
it at once (``spec.failover``). The agent owns ``health``: once back it writes its own
word again, as a kubelet does with its Ready condition.

As Kubernetes' node lifecycle controller does, time is the operator's own: a renewal is
the Lease's ``renewTime`` changing, and the deadline runs from when the operator saw that,
never from the agent's clock (suppliers' clocks are theirs and may be off by minutes). So
a restarted operator gives every agent a full duration again. And when most agents fall
silent at once, the trouble is more likely ours (the API server, the operator's network)
than theirs: nothing is marked until fewer than half are silent.

Only nodes whose agent once held a Lease are watched. GPUNodes reported some other way
(simulated fleets, benchmarks) have none and are never marked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gpumesh.api.lease import lease_terms

LOST: Final = "Lost"
MASS_SILENCE_MIN: Final = 3
"""A silence of this many agents or more, and at least half of them, is held as ours."""


@dataclass(frozen=True)
class Heartbeat:
    """The last renewal seen of one agent's Lease, by the operator's clock."""

    renew_time: str | None
    duration_s: float
    deadline: float


@dataclass(frozen=True)
class Verdict:
    """What to do for one agent now: write ``patch``, and look again at ``recheck_at``."""

    patch: dict[str, Any] | None = None
    recheck_at: float | None = None
    held_back: bool = False
    """Silent, but so are most agents: not marked (see the module docstring)."""


class AgentLiveness:
    """The agents' heartbeats as this operator saw them, and which ones went quiet."""

    def __init__(self) -> None:
        self._beats: dict[str, Heartbeat] = {}

    def observe(self, node: str, lease: Mapping[str, Any], now: float) -> float | None:
        """A Lease event: a changed renewTime (or a first sighting) starts a new deadline.

        Returns the deadline, or None when the Lease is unreadable (nothing is watched).
        """
        renewal = lease_terms(lease)
        if renewal is None:
            return None
        renew_time, duration = renewal
        seen = self._beats.get(node)
        if seen is not None and seen.renew_time == renew_time and seen.duration_s == duration:
            return seen.deadline  # a relist or an unrelated edit: no renewal
        self._beats[node] = Heartbeat(renew_time, duration, now + duration)
        return now + duration

    def deadline(self, node: str) -> float | None:
        beat = self._beats.get(node)
        return beat.deadline if beat is not None else None

    def forget(self, node: str) -> None:
        self._beats.pop(node, None)

    def verdict(
        self, node: str, lease: Mapping[str, Any] | None, health: str | None, now: float
    ) -> Verdict:
        """Decide for ``node`` at ``now``, given its Lease as the API has it now (None:
        deleted) and its GPUNode's health (None: no GPUNode)."""
        if node not in self._beats:
            return Verdict()
        if lease is not None:
            deadline = self.observe(node, lease, now)
            if deadline is None or deadline > now:
                return Verdict(recheck_at=deadline)
        elif self._beats[node].deadline > now:
            return Verdict(recheck_at=self._beats[node].deadline)
        if health is None or health == LOST:
            return Verdict()
        silent = sum(1 for beat in self._beats.values() if beat.deadline <= now)
        if silent >= MASS_SILENCE_MIN and 2 * silent >= len(self._beats):
            again = now + min(beat.duration_s for beat in self._beats.values())
            return Verdict(recheck_at=again, held_back=True)
        return Verdict(patch={"status": {"health": LOST}})
