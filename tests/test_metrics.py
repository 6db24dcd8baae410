"""Metrics: what a scrape contains, DCGM names, and that scrapes never reach NVML."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpumesh.clock import ManualClock
from gpumesh.node_agent.collector import Collector, XidInbox
from gpumesh.node_agent.metrics import AgentVitals, MetricsCache, agent_routes
from gpumesh.node_agent.nvml.fake import FakeGpu, FakeNvml
from gpumesh.node_agent.nvml.types import DeviceSample, XidEvent
from gpumesh.node_agent.snapshot import NodeSnapshot
from gpumesh.serve import HttpServer


class CountingNvml(FakeNvml):
    """The fake, counting device samples."""

    samples = 0

    def sample(self, index: int) -> DeviceSample:
        self.samples += 1
        return super().sample(index)


def sweep(
    faults: list[dict[str, Any]] | None = None, xids: list[int] | None = None
) -> NodeSnapshot:
    clock = ManualClock()
    nvml = FakeNvml([FakeGpu(), FakeGpu()], faults or [], clock=clock, node_name="n1")
    inbox = XidInbox()
    for xid in xids or []:
        inbox.put(XidEvent(index=1, xid=xid, at=0.0))
    collector = Collector(nvml, "n1", clock, inbox=inbox)
    collector.sweep()
    return collector.sweep()


def scrape(snapshot: NodeSnapshot, *, dcgm: bool = False, vitals: AgentVitals | None = None) -> str:
    cache = MetricsCache(dcgm_names=dcgm)
    cache.update(snapshot, vitals or AgentVitals())
    return cache.body().decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for lab, v in found[name] if all(lab.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_scrape_carries_every_gpu_series_with_its_labels() -> None:
    snap = sweep()
    found = samples(scrape(snap))
    uuid = snap.gpus[0].uuid
    labels = {"node": "n1", "gpu": "0", "uuid": uuid, "model": "NVIDIA H100 80GB HBM3"}
    sample = snap.gpus[0].sample
    assert sample is not None
    assert value(found, "gpumesh_gpu_temperature_celsius", **labels) == sample.temperature_c
    assert value(found, "gpumesh_gpu_power_watts", **labels) == sample.power_w
    assert value(found, "gpumesh_gpu_power_limit_watts", **labels) == 700.0
    assert value(found, "gpumesh_gpu_utilization_ratio", **labels) == pytest.approx(
        (sample.gpu_utilization_pct or 0) / 100
    )
    assert value(found, "gpumesh_gpu_memory_used_bytes", **labels) == (
        (sample.memory_used_mib or 0) * 2**20
    )
    assert value(found, "gpumesh_gpu_memory_total_bytes", **labels) == 81559 * 2**20
    assert value(found, "gpumesh_gpu_health", state="Healthy", **labels) == 1
    assert value(found, "gpumesh_gpu_health", state="Lost", **labels) == 0
    assert value(found, "gpumesh_gpu_health_severity", **labels) == 0
    assert (
        value(
            found,
            "gpumesh_gpu_ecc_errors_total",
            error_type="uncorrectable",
            counter="volatile",
            **labels,
        )
        == 0
    )
    assert value(found, "gpumesh_gpu_throttled", reason="hw_thermal_slowdown", **labels) == 0
    assert value(found, "gpumesh_gpu_row_remap_pending", **labels) == 0
    assert value(found, "gpumesh_gpu_info", pci_bus_id="00000000:18:00.0", **labels) == 1
    assert value(found, "gpumesh_node_health", node="n1", state="Healthy") == 1
    assert value(found, "gpumesh_node_gpus", node="n1") == 2
    assert value(found, "gpumesh_agent_nvml_up", node="n1") == 1
    assert value(found, "gpumesh_agent_sweeps_total", node="n1") == 2
    assert "process_resident_memory_bytes" in found
    assert "gpumesh_agent_api_up" not in found  # reporting is off
    assert not any(name.startswith("DCGM_") for name in found)


def test_xid_counts_by_code_and_fault_states() -> None:
    snap = sweep(
        faults=[
            {"atSeconds": 0, "gpuIndex": 0, "kind": "thermal"},
            {"atSeconds": 0, "gpuIndex": 1, "kind": "row_remap_pending"},
        ],
        xids=[13, 13, 63],
    )
    found = samples(scrape(snap))
    assert value(found, "gpumesh_gpu_xid_errors_total", gpu="1", xid="13") == 2
    assert value(found, "gpumesh_gpu_xid_errors_total", gpu="1", xid="63") == 1
    assert value(found, "gpumesh_gpu_throttled", gpu="0", reason="sw_thermal_slowdown") == 1
    assert value(found, "gpumesh_gpu_clock_event_reasons", gpu="0") == 0x20 | 0x40 | 0x8
    assert value(found, "gpumesh_gpu_health", gpu="0", state="Degraded") == 1
    assert value(found, "gpumesh_gpu_row_remap_pending", gpu="1") == 1
    assert value(found, "gpumesh_gpu_remapped_rows", gpu="1", error_type="uncorrectable") == 1
    assert value(found, "gpumesh_gpu_health", gpu="1", state="NeedsReset") == 1
    assert value(found, "gpumesh_node_health", state="NeedsReset") == 1


def test_a_lost_gpu_keeps_its_identity_and_health_series() -> None:
    snap = sweep(faults=[{"atSeconds": 0, "gpuIndex": 1, "kind": "gpu_lost"}])
    found = samples(scrape(snap))
    assert value(found, "gpumesh_gpu_health", gpu="1", state="Lost") == 1
    assert not [lab for lab, _ in found["gpumesh_gpu_temperature_celsius"] if lab["gpu"] == "1"]


def test_dcgm_names_on_request() -> None:
    snap = sweep(xids=[79])
    found = samples(scrape(snap, dcgm=True))
    dcgm = {"gpu": "1", "UUID": snap.gpus[1].uuid, "device": "nvidia1", "Hostname": "n1"}
    for name in (
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    ):
        value(found, name, **dcgm)
    assert value(found, "DCGM_FI_DEV_XID_ERRORS", **dcgm) == 79
    assert value(found, "DCGM_FI_DEV_XID_ERRORS", gpu="0") == 0
    assert value(found, "DCGM_FI_DEV_GPU_TEMP", modelName="NVIDIA H100 80GB HBM3", gpu="0")
    assert "gpumesh_gpu_temperature_celsius" in found  # ours stay


def test_api_vitals_appear_when_reporting() -> None:
    found = samples(
        scrape(sweep(), vitals=AgentVitals(api_enabled=True, api_up=False, api_errors=3))
    )
    assert value(found, "gpumesh_agent_api_up", node="n1") == 0
    assert value(found, "gpumesh_agent_api_errors_total", node="n1") == 3


def test_cache_before_any_sweep_is_valid_exposition() -> None:
    text = MetricsCache().body().decode()
    assert "gpumesh_gpu" not in text
    list(text_string_to_metric_families(text))


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, MetricsCache, CountingNvml, Collector]]:
    clock = ManualClock()
    nvml = CountingNvml([FakeGpu()] * 8, clock=clock)
    collector = Collector(nvml, "n1", clock)
    cache = MetricsCache()
    cache.update(collector.sweep())
    healthy = [True]
    health = lambda: (healthy[0], "ok" if healthy[0] else "stalled")  # noqa: E731
    srv = HttpServer("127.0.0.1", 0, agent_routes(cache, health)).start()
    try:
        yield srv, cache, nvml, collector
    finally:
        srv.stop()


def get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    resp = c.getresponse()
    body = resp.read()
    if conn is None:
        c.close()
    return resp.status, body


def test_http_serves_the_cache_and_never_calls_nvml(
    server: tuple[HttpServer, MetricsCache, CountingNvml, Collector],
) -> None:
    srv, cache, nvml, collector = server
    before = nvml.samples
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    bodies = {get(srv.port, "/metrics", conn)[1] for _ in range(50)}  # keep-alive
    conn.close()
    assert nvml.samples == before  # 50 scrapes, zero NVML calls
    assert len(bodies) == 1
    assert b'gpumesh_gpu_temperature_celsius{gpu="7"' in next(iter(bodies))
    cache.update(collector.sweep())
    assert nvml.samples == before + 8
    assert get(srv.port, "/metrics")[1] != next(iter(bodies))


def test_healthz_and_unknown_paths(
    server: tuple[HttpServer, MetricsCache, CountingNvml, Collector],
) -> None:
    srv = server[0]
    assert get(srv.port, "/healthz") == (200, b"ok\n")
    assert get(srv.port, "/nope")[0] == 404
