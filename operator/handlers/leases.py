"""kopf glue for the agents' heartbeat Leases: one handler for both readers.

The mesh (a node whose Lease lapsed leaves the catalogue) and agent liveness (its GPUNode
becomes Lost). One handler, not one per module: an agent renews every 10 s, so a large
mesh brings a steady stream of these events, and kopf's cost is per handler invoked.
"""

from __future__ import annotations

from typing import Any

import kopf

from gpumesh.operator.handlers import liveness, mesh


@kopf.on.event("coordination.k8s.io", "v1", "leases", when=mesh.is_agent_lease)
def agent_lease(type: str | None, body: kopf.Body, **_: Any) -> None:
    """An agent renewed, created or deleted its heartbeat Lease."""
    mesh.lease_changed(type, body)
    liveness.lease_changed(type, body)
