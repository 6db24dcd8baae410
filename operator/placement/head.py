"""Where the Ray head runs: a head-capable node (its host trusted) near the workers.

The head holds the cluster's state (GCS), so it goes only to nodes the mesh trusts, and a
running head stays put while its node is still trusted: moving it restarts the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gpumesh.api.gpucluster import HeadSpec
from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.operator.placement.explain import explain_head
from gpumesh.operator.placement.index import InventoryIndex
from gpumesh.operator.placement.inventory import NodeOffer
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes


def choose_head(
    head: HeadSpec,
    index: InventoryIndex,
    free_of: Callable[[NodeOffer], tuple[int, int, int]],
    workers_by_region: Mapping[str, int],
    current_head: str | None = None,
) -> NodeOffer | None:
    """The current head if still trusted, else the first node with room, in the region
    most workers are in (CPU-only nodes first, then by name)."""
    wanted = set(head.node_selector.items())
    if current_head is not None:
        offer = index.by_name.get(current_head)
        if (
            offer is not None
            and offer.head_capable
            and offer.health in ACCEPTING_HEALTH
            and wanted <= offer.labels
        ):
            return offer
    cpu, memory = cpu_millicores(head.cpu), memory_bytes(head.memory)
    for region in sorted(index.heads, key=lambda r: (-workers_by_region.get(r, 0), r)):
        for offer in index.heads[region]:
            if wanted and not wanted <= offer.labels:
                continue
            _, cpu_free, memory_free = free_of(offer)
            if cpu_free >= cpu and memory_free >= memory:
                return offer
    return None


def head_shortfall(head: HeadSpec, index: InventoryIndex) -> str:
    """Why no node can host the head."""
    wanted = set(head.node_selector.items())
    count = sum(1 for nodes in index.heads.values() for o in nodes if wanted <= o.labels)
    return explain_head(head.cpu, head.memory, dict(head.node_selector), count)
