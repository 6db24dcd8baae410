"""How each API kind is served: names, scope, columns and subresources.

Together with the models this is everything the CRD generator needs, so adding a kind is
one model module plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpumesh.api.base import ApiModel
from gpumesh.api.gpucluster import GPUCluster
from gpumesh.api.gpunode import GPUNode
from gpumesh.api.gpuquota import GPUQuota
from gpumesh.api.job import Job

CATEGORY = "gpumesh"


@dataclass(frozen=True)
class PrinterColumn:
    """One column of `kubectl get`."""

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str
    priority: int = 0


@dataclass(frozen=True)
class ScaleSubresource:
    """Paths that make `kubectl scale` and autoscalers work on a kind."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None


@dataclass(frozen=True)
class KindInfo:
    """A served API kind."""

    model: type[ApiModel]
    kind: str
    plural: str
    short_names: tuple[str, ...]
    scope: Literal["Namespaced", "Cluster"]
    columns: tuple[PrinterColumn, ...]
    scale: ScaleSubresource | None = None
    categories: tuple[str, ...] = field(default=(CATEGORY,))
    unreconciled_status: tuple[tuple[str, int], ...] = ()
    """The status the API server shows until a controller writes one (a CRD default).
    ``observedGeneration: 0`` makes kstatus (Flux's health checks, cli-utils) read a new
    object as not yet reconciled rather than as done, however long the first write
    takes."""

    @property
    def singular(self) -> str:
        return self.kind.lower()


UNRECONCILED = (("observedGeneration", 0),)
"""What a renter's object shows until the operator writes its status (a CRD default)."""

AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation.")

GPUCLUSTER = KindInfo(
    model=GPUCluster,
    kind="GPUCluster",
    plural="gpuclusters",
    short_names=("gpuc", "gcl"),
    scope="Namespaced",
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Summary of the cluster's state."),
        PrinterColumn("Ready", "integer", ".status.readyWorkers", "Ready workers."),
        PrinterColumn("Desired", "integer", ".status.desiredWorkers", "Workers asked for."),
        PrinterColumn("GPUs", "integer", ".status.gpus", "GPUs held."),
        PrinterColumn("USD/h", "string", ".status.pricePerHour", "Price per hour now."),
        PrinterColumn(
            "RayCluster", "string", ".status.rayClusterName", "The KubeRay RayCluster.", 1
        ),
        AGE,
    ),
    scale=ScaleSubresource(
        spec_replicas_path=".spec.workers.replicas",
        status_replicas_path=".status.workerReplicas",
        label_selector_path=".status.selector",
    ),
    unreconciled_status=UNRECONCILED,
)

JOB = KindInfo(
    model=Job,
    kind="Job",
    plural="jobs",
    short_names=("gjob", "gj"),
    scope="Namespaced",
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Where the job stands."),
        PrinterColumn("Queue", "integer", ".status.queuePosition", "Place in the queue."),
        PrinterColumn("Attempts", "integer", ".status.attempts", "Attempts started."),
        PrinterColumn("GPU-s", "number", ".status.gpuSeconds", "GPU-seconds held."),
        PrinterColumn("USD", "string", ".status.cost", "Spent so far."),
        PrinterColumn("RayJob", "string", ".status.rayJobName", "The KubeRay RayJob.", 1),
        AGE,
    ),
    unreconciled_status=UNRECONCILED,
)

GPUNODE = KindInfo(
    model=GPUNode,
    kind="GPUNode",
    plural="gpunodes",
    short_names=("gpun", "gn"),
    scope="Cluster",
    columns=(
        PrinterColumn("Supplier", "string", ".spec.supplier", "Supplier owning the node."),
        PrinterColumn("Region", "string", ".spec.region", "Region of the node."),
        PrinterColumn("Model", "string", ".status.gpuModel", "GPU model."),
        PrinterColumn("GPUs", "integer", ".status.gpuCount", "GPUs found."),
        PrinterColumn("Health", "string", ".status.health", "Worst GPU health."),
        PrinterColumn("USD/GPU-h", "string", ".spec.pricePerGpuHour", "Asking price."),
        PrinterColumn("Verified", "string", ".status.verification.result", "Proof-of-GPU result."),
        AGE,
    ),
)

GPUQUOTA = KindInfo(
    model=GPUQuota,
    kind="GPUQuota",
    plural="gpuquotas",
    short_names=("gquota", "gq"),
    scope="Namespaced",
    columns=(
        PrinterColumn("GPUs", "integer", ".status.used.gpus", "GPUs held."),
        PrinterColumn("Max GPUs", "integer", ".spec.hard.gpus", "GPU limit."),
        PrinterColumn("USD/h", "string", ".status.used.pricePerHour", "Spend per hour now."),
        PrinterColumn("Max USD/h", "string", ".spec.hard.pricePerHour", "Spend limit."),
        AGE,
    ),
)

KINDS: tuple[KindInfo, ...] = (GPUCLUSTER, JOB, GPUNODE, GPUQUOTA)


def kind_info(kind: str) -> KindInfo:
    """The served kind called ``kind``; KeyError names the kinds there are."""
    for info in KINDS:
        if info.kind == kind:
            return info
    raise KeyError(f"unknown kind {kind!r}; gpumesh serves {', '.join(k.kind for k in KINDS)}")
