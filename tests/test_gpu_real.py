"""The agent on a real NVIDIA GPU: real NVML, the real proof of GPU, the real agent process.

These need a GPU and its driver, so ``make test`` deselects them (marker ``gpu``); run them
where one exists with ``make test-gpu``. They never skip: on a machine without a GPU they
fail at ``nvmlInit``. What they printed on a lent H100 is in docs/node-agent.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from gpumesh.api.catalogue import UUID_RE, sku_for
from gpumesh.api.gpunode import GPUInfo
from gpumesh.clock import SystemClock
from gpumesh.node_agent.collector import Collector
from gpumesh.node_agent.metrics import MetricsCache
from gpumesh.node_agent.nvml.real import PynvmlBackend
from gpumesh.node_agent.nvml.types import DeviceIdentity
from gpumesh.node_agent.prove import ChildProver, select_prover
from gpumesh.node_agent.selfcheck import self_check
from gpumesh.operator.proof import identity_problems
from loopback import http_get
from testbed.ports import free_port

pytestmark = pytest.mark.gpu

PCI_RE = re.compile(r"^[0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")


@pytest.fixture
def nvml() -> Iterator[PynvmlBackend]:
    backend = PynvmlBackend()
    backend.init()
    yield backend
    backend.shutdown()


@pytest.fixture
def identities(nvml: PynvmlBackend) -> list[DeviceIdentity]:
    return [nvml.identity(i) for i in range(nvml.device_count())]


def test_the_driver_answers_with_its_versions(nvml: PynvmlBackend) -> None:
    assert nvml.device_count() >= 1
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", nvml.driver_version())
    assert re.fullmatch(r"\d+\.\d+", nvml.cuda_version())


def test_every_gpu_is_what_our_catalogue_says_its_product_is(
    identities: list[DeviceIdentity],
) -> None:
    for ident in identities:
        assert UUID_RE.match(ident.uuid), ident
        assert ident.pci_bus_id is not None
        assert PCI_RE.match(ident.pci_bus_id), ident
        assert sku_for(ident.name) is not None, f"{ident.name} is not in the catalogue"
    reported = [
        GPUInfo(index=i.index, uuid=i.uuid, model=i.name, memory_mib=i.memory_total_mib)
        for i in identities
    ]
    assert identity_problems(reported) == []


def test_one_sample_reads_every_sensor_without_errors(nvml: PynvmlBackend) -> None:
    for index in range(nvml.device_count()):
        s = nvml.sample(index)
        assert s.errors == ()
        assert s.temperature_c is not None
        assert 5 <= s.temperature_c <= 110
        assert s.power_w is not None
        assert s.power_limit_w is not None
        assert 0 < s.power_w <= s.power_limit_w * 1.2
        assert s.gpu_utilization_pct is not None
        assert 0 <= s.gpu_utilization_pct <= 100
        assert s.memory_used_mib is not None
        assert s.memory_used_mib <= nvml.identity(index).memory_total_mib
        assert s.clock_event_reasons is not None
        # Data-centre GPUs count ECC errors; a fresh counter is zero, never None.
        assert s.ecc.volatile_uncorrectable is not None


def test_xid_events_can_be_armed_and_waited_for(nvml: PynvmlBackend) -> None:
    nvml.watch_xids()
    started = time.monotonic()
    event = nvml.wait_xid(0.3)
    assert event is None  # a healthy idle GPU raises no critical XID
    assert time.monotonic() - started >= 0.25


def test_a_sweep_finds_every_gpu_healthy_and_renders_its_metrics(
    identities: list[DeviceIdentity],
) -> None:
    snapshot = Collector(PynvmlBackend(), "gpu-test", SystemClock()).sweep()
    assert snapshot.nvml_ok, snapshot.nvml_error
    assert [g.health for g in snapshot.gpus] == ["Healthy"] * len(identities), [
        g.reasons for g in snapshot.gpus
    ]
    cache = MetricsCache(process_metrics=False)
    cache.update(snapshot)
    body = cache.body().decode()
    for ident in identities:
        assert re.search(rf'gpumesh_gpu_temperature_celsius{{[^}}]*uuid="{ident.uuid}"', body)


def _now() -> datetime:
    return datetime.now(UTC)


def test_the_agent_process_serves_real_gpu_metrics(identities: list[DeviceIdentity]) -> None:
    """The real agent, metrics only (no kubeconfig), scraped over HTTP on loopback."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    argv = ["run", "--node", "gpu-test", "--interval", "1"]
    argv += ["--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpumesh.node_agent", *argv],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                status, body = http_get(port, "/metrics")
            except OSError:
                status = 0
            if status == 200 and all(i.uuid in body for i in identities):
                break
            time.sleep(0.5)
        assert all(i.uuid in body for i in identities), body[-2000:]
        assert "gpumesh_gpu_health{" in body
        assert http_get(port, "/healthz")[0] == 200
        dump = os.environ.get("GPUMESH_GPU_METRICS_DUMP")
        if dump:
            with open(dump, "w") as out:
                out.write(body)
    finally:
        agent.terminate()
        assert agent.wait(15) == 0


def test_probe_says_the_node_is_fit_to_join() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gpumesh.node_agent", "probe", "--node", "gpu-test", "--proof"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    assert report["fit"] is True
    assert report["proof"]["problem"] is None
    assert report["proof"]["engine"] == "cupy"


def test_the_agents_proof_runs_in_a_child_and_leaves_no_gpu_memory_behind(
    nvml: PynvmlBackend, identities: list[DeviceIdentity]
) -> None:
    """The agent's prover: CUDA lives in a child for one challenge, so afterwards the GPUs
    hold no more memory than before and this process never loaded a CUDA library. The
    report (TFLOP/s per GPU, commit, open and check times) goes to docs/BENCHMARKS.md."""
    prover = select_prover(fake=False)
    assert isinstance(prover, ChildProver)
    before = [nvml.sample(i.index).memory_used_mib or 0 for i in identities]
    report = self_check(prover, "gpu-test", identities)
    print(json.dumps(report))
    assert report["problem"] is None, report
    assert report["checked"] == 16 * len(identities)
    assert "cupy" not in sys.modules
    after = [nvml.sample(i.index).memory_used_mib or 0 for i in identities]
    assert all(a <= b + 64 for a, b in zip(after, before, strict=True)), (before, after)
