"""Prometheus metrics rendered once per sweep and served from that cache.

A scrape returns bytes rendered at the end of the last sweep: it never calls NVML and does
no work proportional to the GPUs, so scrapes stay sub-millisecond however often they come
and however sick the driver is. (dcgm-exporter collects on its own 30 s clock and still
times out 10 s scrapes; a cache decoupled from the scrape is the fix.)

Our names are ``gpumesh_*`` with labels ``node``, ``gpu``, ``uuid``, ``model``. With
``dcgm_names`` the common dashboard series are also emitted under dcgm-exporter's names
and labels (``DCGM_FI_DEV_GPU_TEMP{gpu, UUID, device, modelName, Hostname}``), so existing
Grafana dashboards work unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gpumesh.node_agent.health import HEALTH_STATES, SEVERITY
from gpumesh.node_agent.nvml.types import (
    CLOCK_EVENT_HW_POWER_BRAKE,
    CLOCK_EVENT_HW_SLOWDOWN,
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_NAMES,
    CLOCK_EVENT_SW_POWER_CAP,
    CLOCK_EVENT_SW_THERMAL,
    MIB,
)
from gpumesh.node_agent.snapshot import GpuSnapshot, NodeSnapshot
from gpumesh.serve import HealthCheck, Route, health_route

log = logging.getLogger(__name__)

LABELS: Final = ("node", "gpu", "uuid", "model")
DCGM_LABELS: Final = ("gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id")
THROTTLE_BITS: Final = (
    CLOCK_EVENT_SW_POWER_CAP,
    CLOCK_EVENT_HW_SLOWDOWN,
    CLOCK_EVENT_SW_THERMAL,
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_HW_POWER_BRAKE,
)
"""Reasons with a series of their own; the full mask is in gpumesh_gpu_clock_event_reasons."""


@dataclass(frozen=True)
class AgentVitals:
    """The agent's own state next to the GPUs' (set by the reporter)."""

    api_enabled: bool = False
    api_up: bool = False
    api_writes: int = 0
    api_errors: int = 0
    verification: str | None = None


def _labels(node: str, g: GpuSnapshot) -> list[str]:
    return [node, str(g.index), g.uuid, g.model]


def _dcgm_labels(node: str, g: GpuSnapshot) -> list[str]:
    pci = g.identity.pci_bus_id if g.identity and g.identity.pci_bus_id else ""
    return [str(g.index), g.uuid, f"nvidia{g.index}", g.model, node, pci]


class _Families:
    """Metric families keyed by name, created on first use, in a stable order."""

    def __init__(self) -> None:
        self._by_name: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: Iterable[str]) -> GaugeMetricFamily:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        assert isinstance(fam, GaugeMetricFamily)
        return fam

    def counter(self, name: str, doc: str, labels: Iterable[str]) -> CounterMetricFamily:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = CounterMetricFamily(name, doc, labels=list(labels))
        assert isinstance(fam, CounterMetricFamily)
        return fam

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


def _gpu_families(fams: _Families, node: str, g: GpuSnapshot) -> None:
    lab = _labels(node, g)
    s = g.sample
    for state in HEALTH_STATES:
        fams.gauge(
            "gpumesh_gpu_health",
            "1 for the GPU's current health state, 0 for the others.",
            [*LABELS, "state"],
        ).add_metric([*lab, state], 1.0 if g.health == state else 0.0)
    fams.gauge(
        "gpumesh_gpu_health_severity",
        "Health as a number: 0 Healthy, 1 Degraded, 2 Unknown, 3 NeedsReset, 4 Unhealthy, 5 Lost.",
        LABELS,
    ).add_metric(lab, SEVERITY[g.health])
    xid = fams.counter(
        "gpumesh_gpu_xid_errors", "XID errors received since the agent started.", [*LABELS, "xid"]
    )
    for code, count in g.xid_counts:
        xid.add_metric([*lab, str(code)], count)
    if s is None:
        return
    values: list[tuple[str, str, float | int | None]] = [
        ("gpumesh_gpu_temperature_celsius", "GPU core temperature.", s.temperature_c),
        ("gpumesh_gpu_power_watts", "Power draw.", s.power_w),
        ("gpumesh_gpu_power_limit_watts", "Enforced power limit.", s.power_limit_w),
        (
            "gpumesh_gpu_utilization_ratio",
            "Fraction of time a kernel ran over the last sample period.",
            None if s.gpu_utilization_pct is None else s.gpu_utilization_pct / 100,
        ),
        (
            "gpumesh_gpu_memory_utilization_ratio",
            "Fraction of time memory was read or written.",
            None if s.memory_utilization_pct is None else s.memory_utilization_pct / 100,
        ),
        (
            "gpumesh_gpu_memory_used_bytes",
            "Frame buffer memory in use.",
            None if s.memory_used_mib is None else s.memory_used_mib * MIB,
        ),
        (
            "gpumesh_gpu_memory_total_bytes",
            "Frame buffer memory in total.",
            g.identity.memory_total_mib * MIB if g.identity else None,
        ),
        (
            "gpumesh_gpu_clock_event_reasons",
            "Bit mask of the reasons clocks are held down (NVML clock event reasons).",
            s.clock_event_reasons,
        ),
    ]
    for name, doc, value in values:
        if value is not None:
            fams.gauge(name, doc, LABELS).add_metric(lab, float(value))
    if s.clock_event_reasons is not None:
        throttled = fams.gauge(
            "gpumesh_gpu_throttled",
            "1 while clocks are held down for a reason.",
            [*LABELS, "reason"],
        )
        for bit in THROTTLE_BITS:
            reason = CLOCK_EVENT_NAMES[bit]
            throttled.add_metric([*lab, reason], 1.0 if s.clock_event_reasons & bit else 0.0)
    ecc = fams.counter(
        "gpumesh_gpu_ecc_errors",
        "ECC errors; volatile counts reset with the GPU, aggregate ones persist.",
        [*LABELS, "error_type", "counter"],
    )
    for error_type, counter, value in (
        ("correctable", "volatile", s.ecc.volatile_correctable),
        ("uncorrectable", "volatile", s.ecc.volatile_uncorrectable),
        ("correctable", "aggregate", s.ecc.aggregate_correctable),
        ("uncorrectable", "aggregate", s.ecc.aggregate_uncorrectable),
    ):
        if value is not None:
            ecc.add_metric([*lab, error_type, counter], value)
    rows = s.remapped_rows
    if rows is not None:
        remapped = fams.gauge(
            "gpumesh_gpu_remapped_rows", "Memory rows remapped.", [*LABELS, "error_type"]
        )
        remapped.add_metric([*lab, "correctable"], rows.correctable)
        remapped.add_metric([*lab, "uncorrectable"], rows.uncorrectable)
        fams.gauge(
            "gpumesh_gpu_row_remap_pending", "1 while a row remap waits for a GPU reset.", LABELS
        ).add_metric(lab, float(rows.pending))
        fams.gauge(
            "gpumesh_gpu_row_remap_failure", "1 when row remapping has failed.", LABELS
        ).add_metric(lab, float(rows.failure))


def _dcgm_families(fams: _Families, node: str, g: GpuSnapshot) -> None:
    s = g.sample
    lab = _dcgm_labels(node, g)
    last_xid = float(g.last_xid or 0)
    fams.gauge(
        "DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", DCGM_LABELS
    ).add_metric(lab, last_xid)
    if s is None:
        return
    free = None
    if g.identity is not None and s.memory_used_mib is not None:
        free = g.identity.memory_total_mib - s.memory_used_mib
    rows = s.remapped_rows
    values: list[tuple[str, str, float | int | None]] = [
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", s.temperature_c),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", s.power_w),
        ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (in W).", s.power_limit_w),
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", s.gpu_utilization_pct),
        ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", s.memory_utilization_pct),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", s.memory_used_mib),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", free),
        (
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            "Total number of single-bit volatile ECC errors.",
            s.ecc.volatile_correctable,
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "Total number of double-bit volatile ECC errors.",
            s.ecc.volatile_uncorrectable,
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            "Total number of single-bit persistent ECC errors.",
            s.ecc.aggregate_correctable,
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
            "Total number of double-bit persistent ECC errors.",
            s.ecc.aggregate_uncorrectable,
        ),
        (
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for correctable errors.",
            None if rows is None else rows.correctable,
        ),
        (
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for uncorrectable errors.",
            None if rows is None else rows.uncorrectable,
        ),
        (
            "DCGM_FI_DEV_ROW_REMAP_FAILURE",
            "Whether remapping of rows has failed.",
            None if rows is None else int(rows.failure),
        ),
        (
            "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
            "Throttling reasons bit mask.",
            s.clock_event_reasons,
        ),
    ]
    for name, doc, value in values:
        if value is not None:
            fams.gauge(name, doc, DCGM_LABELS).add_metric(lab, float(value))


def snapshot_families(
    snapshot: NodeSnapshot | None, vitals: AgentVitals, *, dcgm_names: bool
) -> list[Metric]:
    """Every metric family for a snapshot (pure: the cache renders these)."""
    fams = _Families()
    if snapshot is None:
        return list(fams)
    node = snapshot.node
    for g in snapshot.gpus:
        _gpu_families(fams, node, g)
    if dcgm_names:
        for g in snapshot.gpus:
            _dcgm_families(fams, node, g)
    for state in HEALTH_STATES:
        fams.gauge(
            "gpumesh_node_health", "1 for the node's rolled-up health state.", ["node", "state"]
        ).add_metric([node, state], 1.0 if snapshot.health == state else 0.0)
    fams.gauge("gpumesh_node_gpus", "GPUs the agent knows on this node.", ["node"]).add_metric(
        [node], len(snapshot.gpus)
    )
    info = fams.gauge(
        "gpumesh_gpu_info",
        "Identity of each GPU (value 1).",
        [*LABELS, "pci_bus_id", "compute_capability", "driver_version", "cuda_version"],
    )
    for g in snapshot.gpus:
        if g.identity is not None:
            info.add_metric(
                [
                    *_labels(node, g),
                    g.identity.pci_bus_id or "",
                    g.identity.compute_capability or "",
                    snapshot.driver_version or "",
                    snapshot.cuda_version or "",
                ],
                1.0,
            )
    fams.gauge("gpumesh_agent_nvml_up", "1 while NVML answers.", ["node"]).add_metric(
        [node], float(snapshot.nvml_ok)
    )
    fams.gauge(
        "gpumesh_agent_sweep_duration_seconds", "How long the last sweep took.", ["node"]
    ).add_metric([node], snapshot.sweep_seconds)
    fams.counter("gpumesh_agent_sweeps", "Sweeps since the agent started.", ["node"]).add_metric(
        [node], snapshot.sweeps
    )
    fams.gauge(
        "gpumesh_agent_last_sweep_timestamp_seconds", "Wall time of the last sweep.", ["node"]
    ).add_metric([node], snapshot.taken_at.timestamp())
    if vitals.api_enabled:
        fams.gauge(
            "gpumesh_agent_api_up", "1 while the Kubernetes API answers the agent.", ["node"]
        ).add_metric([node], float(vitals.api_up))
        fams.counter(
            "gpumesh_agent_api_writes", "Writes to the Kubernetes API (only on change).", ["node"]
        ).add_metric([node], vitals.api_writes)
        fams.counter(
            "gpumesh_agent_api_errors", "Failed Kubernetes API calls.", ["node"]
        ).add_metric([node], vitals.api_errors)
    return list(fams)


class _SnapshotCollector(Collector):
    def __init__(self, dcgm_names: bool) -> None:
        self.dcgm_names = dcgm_names
        self.snapshot: NodeSnapshot | None = None
        self.vitals = AgentVitals()

    def collect(self) -> Iterable[Metric]:
        return snapshot_families(self.snapshot, self.vitals, dcgm_names=self.dcgm_names)


class MetricsCache:
    """The exposition text of the latest snapshot, rendered on ``update``."""

    def __init__(self, *, dcgm_names: bool = False, process_metrics: bool = True) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector(dcgm_names)
        self._registry.register(self._collector)
        if process_metrics:
            ProcessCollector(registry=self._registry)
        self._lock = threading.Lock()
        self._body = generate_latest(self._registry)

    def update(
        self, snapshot: NodeSnapshot | None = None, vitals: AgentVitals | None = None
    ) -> None:
        """Render once; scrapes until the next update get these bytes."""
        with self._lock:
            if snapshot is not None:
                self._collector.snapshot = snapshot
            if vitals is not None:
                self._collector.vitals = vitals
            body = generate_latest(self._registry)
            self._body = body

    def body(self) -> bytes:
        return self._body


def agent_routes(cache: MetricsCache, health: HealthCheck) -> dict[str, Route]:
    """``/metrics`` from the cache (a scrape never calls NVML) and ``/healthz``."""
    return {
        "/metrics": lambda: (200, cache.body(), CONTENT_TYPE_LATEST),
        "/healthz": health_route(health),
    }
