"""Placement and admission: which supplier GPUs run which request, and in what order.

Pure: no Kubernetes client here. Handlers list GPUNodes, Nodes and Pods, call
:func:`build_inventory`, then :func:`place_cluster` for one GPUCluster or :func:`admit`
for a pass over the queue, and write the results back as status, conditions and events.
"""

from gpumesh.operator.placement.decision import Assignment, Decision, NodeUsage, with_terms_of
from gpumesh.operator.placement.gang import place_cluster, plan_cluster
from gpumesh.operator.placement.index import InventoryIndex, Ledger, as_index
from gpumesh.operator.placement.inventory import NodeOffer, OfferCache, build_inventory
from gpumesh.operator.placement.preemption import Preemption
from gpumesh.operator.placement.queue import (
    AdmissionPolicy,
    AdmissionResult,
    Verdict,
    admit,
    queue_order,
)
from gpumesh.operator.placement.quota import QuotaLimit, Usage, quota_limits
from gpumesh.operator.placement.scoring import DEFAULT_WEIGHTS, Weights
from gpumesh.operator.placement.workload import Request, Running

__all__ = [
    "DEFAULT_WEIGHTS",
    "AdmissionPolicy",
    "AdmissionResult",
    "Assignment",
    "Decision",
    "InventoryIndex",
    "Ledger",
    "NodeOffer",
    "NodeUsage",
    "OfferCache",
    "Preemption",
    "QuotaLimit",
    "Request",
    "Running",
    "Usage",
    "Verdict",
    "Weights",
    "admit",
    "as_index",
    "build_inventory",
    "place_cluster",
    "plan_cluster",
    "queue_order",
    "quota_limits",
    "with_terms_of",
]
