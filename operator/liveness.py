"""When a node agent goes quiet, its GPUNode is Lost. Pure: no Kubernetes imports.

Each agent renews a heartbeat Lease (``gpumesh-agent-<node>``: 40 s, renewed every 10 s).
Kubernetes marks a Node NotReady when its kubelet's Lease lapses; gpumesh does the same one
level up. When an agent's Lease lapses (or is deleted and not back before it would have
lapsed) while its GPUNode says anything but Lost, the operator writes ``status.health``
Lost. Placement then takes no new work there, and workers leave it at once
(``spec.failover``). The agent owns ``health``: once back it writes its own word again,
as a kubelet does with its Ready condition.

Only nodes whose agent once held a Lease are watched. GPUNodes reported some other way
(simulated fleets, benchmarks) have none and are never marked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from gpumesh.operator.mesh.publish import lease_expiry

LOST: Final = "Lost"


def lapses_at(lease: Mapping[str, Any]) -> float | None:
    """Unix time the Lease lapses (renewTime + leaseDurationSeconds); None if unreadable."""
    expiry = lease_expiry(lease)
    return expiry.timestamp() if expiry is not None else None


def lost_patch(
    health: str | None, lease: Mapping[str, Any] | None, now: float
) -> dict[str, Any] | None:
    """The GPUNode status patch for a quiet agent, or None when there is nothing to mark.

    ``lease`` is the agent's Lease as the API has it now (None: deleted). A Lease that
    still runs, or one we cannot read, marks nothing; neither does a node Lost already.
    """
    if health == LOST:
        return None
    if lease is not None:
        at = lapses_at(lease)
        if at is None or at > now:
            return None
    return {"status": {"health": LOST}}
