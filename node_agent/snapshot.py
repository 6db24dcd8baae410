"""What one sweep saw, as immutable data: the single input of metrics and reports.

A sweep produces a :class:`NodeSnapshot`; the metrics cache renders it, the reporter diffs
it against the API objects. Neither ever calls NVML, so a slow scrape or an unreachable
API server cannot stall collection, and a hung GPU cannot stall a scrape.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from gpumesh.api.gpunode import GPUHealth
from gpumesh.node_agent.nvml.types import DeviceIdentity, DeviceSample


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU at the end of a sweep."""

    index: int
    identity: DeviceIdentity | None
    """None while the GPU has never answered (lost since start, NVML down)."""
    sample: DeviceSample | None
    health: GPUHealth
    reasons: tuple[str, ...] = ()
    xid_counts: tuple[tuple[int, int], ...] = ()
    """(XID, count) received since the agent started, by XID."""
    last_xid: int | None = None

    @property
    def uuid(self) -> str:
        return self.identity.uuid if self.identity else ""

    @property
    def model(self) -> str:
        return self.identity.name if self.identity else ""


@dataclass(frozen=True)
class NodeSnapshot:
    """The whole node at the end of a sweep."""

    node: str
    taken_at: datetime
    monotonic: float
    health: GPUHealth
    gpus: tuple[GpuSnapshot, ...] = ()
    nvml_ok: bool = False
    nvml_error: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    sweep_seconds: float = 0.0
    sweeps: int = 0
    xids_total: int = 0

    @property
    def identities(self) -> list[DeviceIdentity]:
        return [g.identity for g in self.gpus if g.identity is not None]

    @property
    def gpu_model(self) -> str | None:
        """The most common product name (nodes normally hold one model)."""
        names = Counter(i.name for i in self.identities)
        return names.most_common(1)[0][0] if names else None

    @property
    def gpu_memory_mib(self) -> int | None:
        """The smallest GPU memory among GPUs of the common model."""
        model = self.gpu_model
        sizes = [i.memory_total_mib for i in self.identities if i.name == model]
        return min(sizes) if sizes else None
