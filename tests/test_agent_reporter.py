"""The reporter against an in-memory API: writes only on change, Lease, outages, proofs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_agent_fakekube import GPUNODES, FakeKube

from gpumesh.api.nodes import CONDITION_TYPE, MESH_OPERATOR_LABELS, TAINT_KEY
from gpumesh.clock import ManualClock, SystemClock
from gpumesh.node_agent.collector import Collector
from gpumesh.node_agent.kube import KubeError
from gpumesh.node_agent.nvml.fake import FakeGpu, FakeNvml
from gpumesh.node_agent.prove import ProofRunner, select_prover
from gpumesh.node_agent.report import ReportConfig, Reporter
from gpumesh.node_agent.snapshot import NodeSnapshot

LEASE = "/apis/coordination.k8s.io/v1/namespaces/gpumesh-system/leases/gpumesh-agent-n1"


class Rig:
    """A fake node (fake NVML + collector) reporting into a fake API server."""

    def __init__(self, faults: list[dict[str, Any]] | None = None, **config: Any) -> None:
        self.clock = ManualClock()
        self.nvml = FakeNvml([FakeGpu()] * 2, faults or [], clock=self.clock, node_name="n1")
        self.nvml.init()
        self.collector = Collector(self.nvml, "n1", self.clock)
        self.kube = FakeKube()
        self.kube.add_node("n1", status={"capacity": {"nvidia.com/gpu": "2"}})
        self.prover = ProofRunner(select_prover(fake=True), "n1", self.clock)
        settings = {"supplier": "acme", "region": "eu-west", "price_per_gpu_hour": "2.10"}
        self.reporter = Reporter(
            self.kube, ReportConfig(node="n1", **(settings | config)), self.clock, self.prover
        )

    def sweep(self, seconds: float = 0.0) -> NodeSnapshot:
        self.clock.advance(seconds)
        while (event := self.nvml.wait_xid(0)) is not None:
            self.collector.inbox.put(event)
        return self.collector.sweep()

    def sync(self, seconds: float = 0.0) -> list[tuple[str, str]]:
        self.kube.clear_writes()
        self.reporter.sync(self.sweep(seconds))
        return list(self.kube.writes)


def taints(kube: FakeKube) -> list[str]:
    return [t["key"] for t in kube.node("n1").get("spec", {}).get("taints", [])]


def test_first_sync_creates_and_fills_everything_and_the_second_writes_nothing() -> None:
    rig = Rig()
    writes = rig.sync()
    assert writes == [
        ("POST", "/apis/coordination.k8s.io/v1/namespaces/gpumesh-system/leases"),
        ("POST", GPUNODES),
        ("PATCH", f"{GPUNODES}/n1/status"),
        ("PATCH", "/api/v1/nodes/n1"),
        ("PATCH", "/api/v1/nodes/n1/status"),
    ]
    gn = rig.kube.gpunode("n1")
    assert gn["spec"]["supplier"] == "acme"
    assert gn["status"]["health"] == "Healthy"
    assert gn["status"]["gpuCount"] == 2
    labels = rig.kube.node("n1")["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert not set(MESH_OPERATOR_LABELS) & set(labels)  # the mesh operator's, at admission
    (cond,) = rig.kube.node("n1")["status"]["conditions"]
    assert (cond["type"], cond["status"]) == (CONDITION_TYPE, "True")
    assert rig.kube.objects[LEASE]["spec"]["holderIdentity"] == "n1"
    # Steady state: sweeps keep coming, nothing is written.
    for _ in range(5):
        assert rig.sync(1.0) == []
    assert rig.reporter.writes == 5


def test_lease_every_renewal_period_and_status_every_heartbeat() -> None:
    rig = Rig(lease_renew_s=10.0, heartbeat_s=30.0)
    rig.sync()
    renewed = [rig.sync(5.0) for _ in range(6)]
    lease_puts = [w for step in renewed for w in step if w == ("PUT", LEASE)]
    status = [w for step in renewed for w in step if w[1].endswith("gpunodes/n1/status")]
    assert len(lease_puts) == 3  # at 10, 20 and 30 s
    assert len(status) == 1  # the heartbeat at 30 s


def test_an_existing_gpunode_is_reported_into_and_its_spec_left_alone() -> None:
    rig = Rig()
    rig.kube.add_gpunode("n1", supplier="other", region="us-east")
    assert ("POST", GPUNODES) not in rig.sync()
    gn = rig.kube.gpunode("n1")
    assert (gn["spec"]["supplier"], gn["spec"]["region"]) == ("other", "us-east")
    assert gn["status"]["health"] == "Healthy"


def test_without_a_gpunode_or_flags_only_node_and_lease_are_reported() -> None:
    rig = Rig(supplier=None, region=None, price_per_gpu_hour=None)
    writes = rig.sync()
    assert not any(GPUNODES in path for _, path in writes)
    assert rig.kube.node("n1")["metadata"]["labels"]["nvidia.com/gpu.count"] == "2"


def test_a_missing_namespace_skips_the_lease_only() -> None:
    rig = Rig()
    rig.kube.namespaces.clear()
    rig.sync()
    assert LEASE not in rig.kube.objects
    assert rig.kube.gpunode("n1")["status"]["health"] == "Healthy"


def test_xid_79_taints_within_one_sweep_and_recovery_clears_it() -> None:
    rig = Rig(
        [{"atSeconds": 10, "gpuIndex": 1, "kind": "xid", "xidCode": 79, "durationSeconds": 10}]
    )
    rig.kube.node("n1")["spec"] = {"taints": [{"key": "other", "effect": "NoSchedule"}]}
    rig.sync()
    assert taints(rig.kube) == ["other"]
    rig.sync(10.0)
    assert taints(rig.kube) == ["other", TAINT_KEY]
    gn = rig.kube.gpunode("n1")["status"]
    assert gn["health"] == "Lost"
    assert gn["gpus"][1]["health"] == "Lost"
    (cond,) = rig.kube.node("n1")["status"]["conditions"]
    assert (cond["status"], cond["reason"]) == ("False", "GPULost")
    seen = []
    for _ in range(4):
        rig.sync(5.0)
        seen.append(taints(rig.kube))
    assert seen == [["other", TAINT_KEY]] * 3 + [["other"]]  # 3 good sweeps after t=20
    assert rig.kube.gpunode("n1")["status"]["health"] == "Healthy"


def test_a_concurrent_node_writer_costs_one_retry_not_its_change() -> None:
    rig = Rig()
    original = rig.kube.request
    raced: list[bool] = []

    def racing(method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if method == "PATCH" and path == "/api/v1/nodes/n1" and not raced:
            raced.append(True)  # someone else writes first
            node = rig.kube.objects[path]
            node["spec"] = {"taints": [{"key": "theirs", "effect": "NoSchedule"}]}
            node["metadata"]["resourceVersion"] = "999"
        return original(method, path, body, **kw)

    rig.kube.request = racing  # type: ignore[method-assign]
    rig.sync()
    assert raced
    assert taints(rig.kube) == ["theirs"]
    assert rig.kube.node("n1")["metadata"]["labels"]["nvidia.com/gpu.count"] == "2"


def test_drift_is_repaired_after_a_resync() -> None:
    rig = Rig(resync_s=60.0)
    rig.sync()
    del rig.kube.node("n1")["metadata"]["labels"]["nvidia.com/gpu.count"]
    assert ("PATCH", "/api/v1/nodes/n1") not in rig.sync(30.0)  # cached view still fresh
    assert ("PATCH", "/api/v1/nodes/n1") in rig.sync(31.0)
    assert rig.kube.node("n1")["metadata"]["labels"]["nvidia.com/gpu.count"] == "2"


def test_an_outage_raises_and_the_return_reports_what_changed() -> None:
    rig = Rig([{"atSeconds": 5, "gpuIndex": 0, "kind": "gpu_lost"}])
    rig.sync()
    rig.kube.down = True
    with pytest.raises(KubeError) as info:
        rig.sync(5.0)
    assert info.value.transient
    rig.reporter._on_failure(info.value, 1.0)
    assert not rig.reporter.vitals().api_up
    rig.kube.down = False
    rig.sync(1.0)
    assert rig.kube.gpunode("n1")["status"]["health"] == "Lost"
    assert TAINT_KEY in taints(rig.kube)


def test_a_refused_part_does_not_block_the_others() -> None:
    rig = Rig()
    original = rig.kube.request

    def forbid_leases(method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if "leases" in path:
            raise KubeError(method, path, 403, "forbidden")
        return original(method, path, body, **kw)

    rig.kube.request = forbid_leases  # type: ignore[method-assign]
    rig.sync()
    assert rig.kube.gpunode("n1")["status"]["health"] == "Healthy"
    assert rig.reporter.errors == 1


def challenge(uuids: list[str], **extra: Any) -> dict[str, Any]:
    """An operator's challenge for these GPUs, on the wire."""
    gpus = [{"uuid": u, "rows": 32, "inner": 100, "cols": 32} for u in uuids]
    return {
        "id": "0123456789abcdef",
        "seed": "ab" * 32,
        "issuedTime": "2026-01-01T00:00:00Z",
        "deadlineSeconds": 30,
        "gpus": gpus,
        **extra,
    }


def wait_for_proof(rig: Rig, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rig.sync(1.0)
        proof = rig.kube.gpunode("n1").get("status", {}).get("proof") or {}
        if done(proof):
            return proof
        time.sleep(0.01)
    raise AssertionError("no proof")


def test_a_challenge_is_answered_with_roots_then_the_named_entries_opened() -> None:
    rig = Rig()
    rig.kube.add_gpunode("n1")
    rig.sync()
    uuids = [g["uuid"] for g in rig.kube.gpunode("n1")["status"]["gpus"]]
    rig.kube.gpunode("n1")["status"]["challenge"] = challenge(uuids)
    rig.reporter._spec_changed.set()
    proof = wait_for_proof(rig, lambda p: bool(p.get("roots")))
    assert proof["challengeId"] == "0123456789abcdef"
    assert len(proof["roots"]) == 2 and proof["engine"] == "numpy"
    assert not proof.get("openings")  # nothing is opened before the operator names entries
    assert "verification" not in rig.kube.gpunode("n1")["status"]  # the operator judges
    samples = [{"gpu": 1, "row": 5, "col": 17}, {"gpu": 0, "row": 31, "col": 0}]
    rig.kube.gpunode("n1")["status"]["challenge"] = challenge(
        uuids, committedTime="2026-01-01T00:00:01Z", samples=samples
    )
    rig.reporter._spec_changed.set()
    proof = wait_for_proof(rig, lambda p: bool(p.get("openings")))
    assert [(o["gpu"], o["row"], o["col"]) for o in proof["openings"]] == [(1, 5, 17), (0, 31, 0)]
    assert rig.reporter.vitals().verification == "opened"


def test_the_loop_rides_out_an_outage_and_reports_on_return() -> None:
    async def scenario() -> None:
        clock = SystemClock()
        nvml = FakeNvml([FakeGpu()], clock=clock, node_name="n1")
        collector = Collector(nvml, "n1", clock)
        kube = FakeKube()
        kube.add_node("n1")
        kube.down = True
        config = ReportConfig(
            node="n1",
            supplier="acme",
            region="eu-west",
            price_per_gpu_hour="1",
            lease_renew_s=0.2,
            backoff_min_s=0.05,
            backoff_max_s=0.1,
        )
        reporter = Reporter(kube, config, clock)
        stop = asyncio.Event()
        task = asyncio.create_task(reporter.run(stop))
        reporter.offer(collector.sweep())
        await asyncio.sleep(0.3)
        assert not reporter.vitals().api_up
        assert reporter.errors >= 2  # retried, with backoff
        assert kube.writes == []
        kube.down = False
        for _ in range(100):
            await asyncio.sleep(0.02)
            if reporter.vitals().api_up and f"{GPUNODES}/n1" in kube.objects:
                break
        assert reporter.vitals().api_up
        assert kube.gpunode("n1")["status"]["health"] == "Healthy"
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(scenario())


def test_a_new_challenge_is_seen_through_the_watch_not_at_the_next_resync() -> None:
    async def scenario() -> None:
        clock = SystemClock()
        nvml = FakeNvml([FakeGpu()], clock=clock, node_name="n1")
        collector = Collector(nvml, "n1", clock)
        kube = FakeKube()
        kube.add_node("n1")
        kube.add_gpunode("n1")
        config = ReportConfig(node="n1", resync_s=3600, heartbeat_s=3600)
        prover = ProofRunner(select_prover(fake=True), "n1", clock)
        reporter = Reporter(kube, config, clock, prover)
        stop = asyncio.Event()
        task = asyncio.create_task(reporter.run(stop))
        reporter.offer(collector.sweep())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "status" in kube.gpunode("n1"):
                break
        uuid = kube.gpunode("n1")["status"]["gpus"][0]["uuid"]
        issued = challenge([uuid])
        kube.request(
            "PATCH",
            f"{GPUNODES}/n1/status",
            {"status": {"challenge": issued}},
            content_type="application/merge-patch+json",
        )
        proof: dict[str, Any] = {}
        for _ in range(300):
            await asyncio.sleep(0.01)
            proof = kube.gpunode("n1")["status"].get("proof") or {}
            if proof:
                break
        stop.set()
        await asyncio.wait_for(task, 2)
        assert proof.get("challengeId") == "0123456789abcdef"
        assert len(proof.get("roots", [])) == 1

    asyncio.run(scenario())
