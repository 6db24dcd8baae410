"""What the planner reads: one :class:`MeshNode` per GPUNode.

What it publishes, the peer catalogue, is a wire format the agents read too, so it lives
in :mod:`gpumesh.api.mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MeshNode:
    """One node as the planner sees it, read from its GPUNode and heartbeat Lease.

    ``public_endpoint`` is the supplier's ``spec.publicEndpoint``: a node with one is
    reachable from anywhere and may relay for nodes without one. ``alive`` is False once
    the node's heartbeat Lease has expired: it leaves the catalogue but keeps its
    addresses, so it returns with the same ones. ``relay`` False (``spec.meshRelay``) keeps
    a node with a public endpoint out of the relay pool. ``region`` (``spec.region``): a
    NAT'd node is relayed from its own region when a relay sits there.
    """

    name: str
    public_key: str | None = None
    public_endpoint: str | None = None
    alive: bool = True
    relay: bool = True
    region: str | None = None
