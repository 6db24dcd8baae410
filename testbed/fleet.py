"""The fleet file: simulated GPU suppliers and their nodes, turned into kwok Node objects.

A fleet stands in for the real world while developing and testing: each node becomes a
fake Node (annotated for kwok) carrying the capacity and the GPU feature discovery labels a
real supplier node would have, plus gpumesh's own supplier labels. Scripted ``faults`` are
carried for the fake NVML used by the node agent's tests; the control plane ignores them.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from gpumesh.api.manifests import field_problems
from gpumesh.api.nodes import (
    LABEL_DEV_FLEET,
    LABEL_HEAD_CAPABLE,
    LABEL_REGION,
    LABEL_SUPPLIER,
)
from gpumesh.node_agent.nvml.fake import Cheat

KWOK_ANNOTATION: Final = "kwok.x-k8s.io/node"
FLEET_LABEL: Final = LABEL_DEV_FLEET
"""Marks nodes created from a fleet file, so re-applying a changed fleet can prune them."""

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FaultKind(StrEnum):
    """What a scripted fault does to a fake GPU."""

    XID = "xid"
    ECC_DBE = "ecc_dbe"
    ROW_REMAP_PENDING = "row_remap_pending"
    THERMAL = "thermal"
    GPU_LOST = "gpu_lost"
    NVML_INIT_FAILURE = "nvml_init_failure"


class ScriptedFault(_Model):
    """A fault the fake NVML injects ``at_seconds`` after it starts."""

    at_seconds: float = Field(alias="atSeconds", ge=0)
    gpu_index: int = Field(alias="gpuIndex", ge=0)
    kind: FaultKind
    xid_code: int | None = Field(default=None, alias="xidCode", ge=1)

    @model_validator(mode="after")
    def _xid_only_for_xid(self) -> Self:
        if self.xid_code is not None and self.kind is not FaultKind.XID:
            raise ValueError("xidCode is only meaningful for kind: xid")
        return self


class FleetNode(_Model):
    """One simulated machine. ``gpuCount: 0`` makes a CPU-only node (e.g. a Ray head)."""

    name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=63)
    gpu_model: str | None = Field(default=None, alias="gpuModel", min_length=1)
    gpu_count: int = Field(default=0, alias="gpuCount", ge=0, le=64)
    gpu_memory_mib: int | None = Field(default=None, alias="gpuMemoryMiB", gt=0)
    compute_capability: str | None = Field(
        default=None, alias="computeCapability", pattern=r"^[0-9]+\.[0-9]+$"
    )
    cpu: str = Field(pattern=_QUANTITY)
    memory: str = Field(pattern=_QUANTITY)
    pods: int = Field(default=110, gt=0)
    faults: tuple[ScriptedFault, ...] = ()
    cheat: Cheat | None = None
    """How this node's agent lies in its proof of GPU (the operator must catch it)."""

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_as_text(cls, v: object) -> object:
        """Accept ``cpu: 32`` as well as ``cpu: "32"``: YAML users write both."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _gpu_fields_consistent(self) -> Self:
        gpu_fields = (self.gpu_model, self.gpu_memory_mib, self.compute_capability)
        if self.gpu_count > 0 and any(f is None for f in gpu_fields):
            raise ValueError(
                f"node {self.name}: gpuModel, gpuMemoryMiB and computeCapability are required "
                "when gpuCount > 0"
            )
        if self.gpu_count == 0 and any(f is not None for f in gpu_fields):
            raise ValueError(f"node {self.name}: GPU fields given but gpuCount is 0")
        if self.cheat is not None and self.gpu_count == 0:
            raise ValueError(f"node {self.name}: cheat needs GPUs to lie about")
        for fault in self.faults:
            if fault.gpu_index >= self.gpu_count:
                raise ValueError(
                    f"node {self.name}: fault targets gpuIndex {fault.gpu_index} but the node "
                    f"has {self.gpu_count} GPUs"
                )
        return self


class Supplier(_Model):
    """A GPU supplier: a data centre or an individual, with a price and a trust level."""

    name: str = Field(pattern=_DNS_LABEL, max_length=63)
    region: str = Field(pattern=_DNS_LABEL, max_length=63)
    price_per_gpu_hour: Decimal = Field(alias="pricePerGpuHour", ge=0)
    head_capable: bool = Field(default=False, alias="headCapable")
    nodes: tuple[FleetNode, ...] = Field(min_length=1)

    @field_validator("price_per_gpu_hour", mode="before")
    @classmethod
    def _price_is_decimal_string(cls, v: object) -> object:
        """Prices are decimal strings: a YAML float would already have lost exactness."""
        if not isinstance(v, str):
            raise ValueError('pricePerGpuHour must be a decimal string, e.g. "2.49"')
        try:
            Decimal(v)
        except InvalidOperation:
            raise ValueError(f"pricePerGpuHour {v!r} is not a decimal number") from None
        return v

    @field_serializer("price_per_gpu_hour")
    def _price_out(self, v: Decimal) -> str:
        return str(v)


class Fleet(_Model):
    """The whole simulated world: suppliers and their nodes, with unique names."""

    suppliers: tuple[Supplier, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen_suppliers: set[str] = set()
        seen_nodes: set[str] = set()
        for s in self.suppliers:
            if s.name in seen_suppliers:
                raise ValueError(f"duplicate supplier {s.name}")
            seen_suppliers.add(s.name)
            for n in s.nodes:
                if n.name in seen_nodes:
                    raise ValueError(f"duplicate node {n.name}")
                seen_nodes.add(n.name)
        return self

    def nodes(self) -> list[tuple[Supplier, FleetNode]]:
        """Every node with its supplier, in file order."""
        return [(s, n) for s in self.suppliers for n in s.nodes]


class FleetError(ValueError):
    """A fleet file that does not describe a fleet; says where and why."""


def load_fleet(path: Path | str) -> Fleet:
    """Parse and validate a fleet YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FleetError(f"fleet {path}: {err}") from None
    try:
        return Fleet.model_validate(data)
    except ValidationError as err:
        raise FleetError(f"fleet {path}: {field_problems(err)}") from None


def gfd_product_label(model: str) -> str:
    """GPU feature discovery's ``nvidia.com/gpu.product`` value: spaces become dashes."""
    value = re.sub(r"\s+", "-", model.strip())
    return re.sub(r"[^A-Za-z0-9._-]", "_", value)[:63].strip("-_.")


def _bool(v: bool) -> str:
    return "true" if v else "false"


def node_labels(supplier: Supplier, node: FleetNode) -> dict[str, str]:
    """The labels a real node from this supplier would carry (GFD's plus gpumesh's)."""
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        FLEET_LABEL: "true",
        # What the mesh operator sets when it admits a node (no agent may).
        LABEL_SUPPLIER: supplier.name,
        LABEL_REGION: supplier.region,
        "topology.kubernetes.io/region": supplier.region,
        LABEL_HEAD_CAPABLE: _bool(supplier.head_capable),
    }
    if node.gpu_count > 0:
        assert node.gpu_model
        assert node.gpu_memory_mib
        assert node.compute_capability
        major, minor = node.compute_capability.split(".")
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": gfd_product_label(node.gpu_model),
            "nvidia.com/gpu.memory": str(node.gpu_memory_mib),
            "nvidia.com/gpu.count": str(node.gpu_count),
            "nvidia.com/gpu.compute.major": major,
            "nvidia.com/gpu.compute.minor": minor,
        }
    return labels


def node_manifest(supplier: Supplier, node: FleetNode) -> dict[str, Any]:
    """A kwok-managed Node: the annotation hands it to kwok, status carries capacity."""
    resources: dict[str, str] = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods)}
    if node.gpu_count > 0:
        resources["nvidia.com/gpu"] = str(node.gpu_count)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "annotations": {
                KWOK_ANNOTATION: "fake",
                "gpumesh.io/price-per-gpu-hour": str(supplier.price_per_gpu_hour),
            },
            "labels": node_labels(supplier, node),
        },
        "spec": {},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def node_manifests(fleet: Fleet) -> list[dict[str, Any]]:
    """All Node manifests for a fleet, in file order."""
    return [node_manifest(s, n) for s, n in fleet.nodes()]
