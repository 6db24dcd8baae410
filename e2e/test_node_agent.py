"""Node agents (fake NVML, one per kwok node) against the real control plane.

Each agent is the shipped program (``python -m gpumesh.node_agent run``) playing one node
of the example fleet. They fill GPUNode status, node labels, the GPUHealthy condition and
the heartbeat Lease; a scripted XID 79 taints its node within 10 s, and the GPU coming
back clears the taint.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpumesh.api.nodes import CONDITION_TYPE, TAINT_KEY
from gpumesh.node_agent.desired import gfd_product
from gpumesh.node_agent.kube import KubeError, RestKubeApi
from testbed import install
from testbed.testing import KubeTarget, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
GPUNODES = "/apis/gpumesh.io/v1alpha1/gpunodes"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/gpumesh-system/leases"
STEADY = ("atlas-h100-0", "nordic-a100-40g-0")
FAULTY = "atlas-h100-1"
XID_AT_S = 5.0
XID_FOR_S = 10.0


def _fleet_nodes() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    doc = yaml.safe_load((ROOT / "examples" / "fleet.yaml").read_text())
    return {n["name"]: (s, n) for s in doc["suppliers"] for n in s["nodes"]}


@pytest.fixture(scope="module")
def api(kube: KubeTarget) -> RestKubeApi:
    """The agent's own client on the test cluster, with the GPUNode CRD and namespace."""
    if kube.fleet is None:
        pytest.skip("external cluster: no simulated fleet to play")
    client = RestKubeApi(kube.api)
    crd = yaml.safe_load((ROOT / "crds" / "gpumesh.io_gpunodes.yaml").read_text())
    client.request(
        "PATCH",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gpunodes.gpumesh.io"
        "?fieldManager=gpumesh-e2e&force=true",
        crd,
        content_type="application/apply-patch+yaml",
    )
    with contextlib.suppress(KubeError):  # already there
        client.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gpumesh-system"}},
        )

    def served() -> bool:
        try:
            client.request("GET", GPUNODES)
        except KubeError:
            return False
        return True

    wait_for("the GPUNode CRD to be served", served, timeout=60)
    return client


def _clean(api: RestKubeApi, node: str) -> None:
    """Leave no GPUNode, Lease or taint of ours behind (also from an aborted earlier run)."""
    for path in (f"{GPUNODES}/{node}", f"{LEASES}/gpumesh-agent-{node}"):
        with contextlib.suppress(KubeError):
            api.request("DELETE", path)
    current = api.get(f"/api/v1/nodes/{node}") or {}
    taints = (current.get("spec") or {}).get("taints") or []
    if any(t.get("key") == TAINT_KEY for t in taints):
        api.request(
            "PATCH",
            f"/api/v1/nodes/{node}",
            {"spec": {"taints": [t for t in taints if t.get("key") != TAINT_KEY]}},
            content_type="application/merge-patch+json",
        )


@pytest.fixture(scope="module")
def identities(kube: KubeTarget, api: RestKubeApi) -> Iterator[install.Identities]:
    """The charts installed; each agent runs on its own pod's token, as the chart's user."""
    assert kube.fleet is not None
    home = install.agents_home(f"{kube.kubeconfig}:node-agent")
    yield install.Identities.install(kube.api, kube.kubeconfig, kube.fleet, home, prune=False)
    shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def agents(
    ids: install.Identities, api: RestKubeApi, nodes: tuple[str, ...], fleet: Path
) -> Iterator[float]:
    """Run one agent per node; yields the time they were started (monotonic)."""
    for node in nodes:
        _clean(api, node)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [fleet.parent / f"agent-{node}.log" for node in nodes]
    fleet = ids.share(fleet)
    started = time.monotonic()
    try:
        for node, log in zip(nodes, logs, strict=True):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        install.as_agent_user(
                            [
                                sys.executable,
                                "-m",
                                "gpumesh.node_agent",
                                "run",
                                "--node",
                                node,
                                "--kubeconfig",
                                str(ids.kubeconfig(node)),
                                "--fake-nvml",
                                str(fleet),
                                "--interval",
                                "1",
                                "--metrics-host",
                                "127.0.0.1",
                                "--metrics-port",
                                "0",
                                "--lease-renew",
                                "2",
                            ]
                        ),
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield started
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, f"agent exited early:\n{log.read_text()[-3000:]}"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for node in nodes:
            _clean(api, node)


def _fleet_file(tmp: Path, faults: dict[str, list[dict[str, Any]]]) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "fleet.yaml").read_text())
    for supplier in doc["suppliers"]:
        for node in supplier["nodes"]:
            node["faults"] = faults.get(node["name"], [])
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _status(api: RestKubeApi, node: str) -> dict[str, Any]:
    return (api.get(f"{GPUNODES}/{node}") or {}).get("status") or {}


def _condition(api: RestKubeApi, node: str) -> dict[str, Any]:
    obj = api.get(f"/api/v1/nodes/{node}") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == CONDITION_TYPE), {})


def _healthy(api: RestKubeApi, node: str) -> dict[str, Any] | None:
    status = _status(api, node)
    return status if status.get("health") == "Healthy" else None


def _renewed_since(api: RestKubeApi, node: str, renew_time: str) -> bool:
    lease = api.get(f"{LEASES}/gpumesh-agent-{node}") or {}
    return bool(lease.get("spec", {}).get("renewTime") != renew_time)


def _taints(api: RestKubeApi, node: str) -> list[str]:
    obj = api.get(f"/api/v1/nodes/{node}") or {}
    return [t["key"] for t in (obj.get("spec") or {}).get("taints") or []]


def test_agents_fill_status_labels_condition_and_lease(
    identities: install.Identities, api: RestKubeApi, tmp_path: Path
) -> None:
    fleet = _fleet_file(tmp_path, {})
    specs = _fleet_nodes()
    with agents(identities, api, STEADY, fleet):
        for node in STEADY:
            supplier, spec = specs[node]
            status = wait_for(f"{node} GPUNode status", partial(_healthy, api, node), timeout=30)
            assert status["gpuCount"] == spec["gpuCount"]
            assert status["gpuModel"] == spec["gpuModel"]
            assert status["driverVersion"]
            assert status["cudaVersion"]
            assert status["heartbeatTime"]
            assert [g["index"] for g in status["gpus"]] == list(range(spec["gpuCount"]))
            assert {g["health"] for g in status["gpus"]} == {"Healthy"}
            assert len({g["uuid"] for g in status["gpus"]}) == spec["gpuCount"]
            gpunode = api.get(f"{GPUNODES}/{node}") or {}
            assert gpunode["spec"]["supplier"] == supplier["name"]  # created by the agent
            labels = (api.get(f"/api/v1/nodes/{node}") or {})["metadata"]["labels"]
            assert labels["nvidia.com/gpu.product"] == gfd_product(spec["gpuModel"])
            assert labels["nvidia.com/gpu.memory"] == str(spec["gpuMemoryMiB"])
            assert labels["nvidia.com/gpu.count"] == str(spec["gpuCount"])
            assert labels["gpumesh.io/supplier"] == supplier["name"]
            assert labels["gpumesh.io/region"] == supplier["region"]
            cond = wait_for(f"{node} condition", partial(_condition, api, node), timeout=10)
            assert (cond["status"], cond["reason"]) == ("True", "AllGPUsHealthy")
            lease = api.get(f"{LEASES}/gpumesh-agent-{node}") or {}
            assert lease["spec"]["holderIdentity"] == node
            renewed = partial(_renewed_since, api, node, lease["spec"]["renewTime"])
            wait_for(f"{node} Lease renewal", renewed, timeout=10)
            assert TAINT_KEY not in _taints(api, node)


def test_scripted_xid_79_taints_within_10_s_and_recovery_clears_it(
    identities: install.Identities, api: RestKubeApi, tmp_path: Path
) -> None:
    fault = {
        "atSeconds": XID_AT_S,
        "gpuIndex": 3,
        "kind": "xid",
        "xidCode": 79,
        "durationSeconds": XID_FOR_S,
    }
    fleet = _fleet_file(tmp_path, {FAULTY: [fault]})
    with agents(identities, api, (FAULTY,), fleet) as started:
        wait_for("a healthy first report", partial(_healthy, api, FAULTY))
        assert TAINT_KEY not in _taints(api, FAULTY)
        wait_for("the taint", lambda: TAINT_KEY in _taints(api, FAULTY), timeout=30, interval=0.1)
        # The fake starts its clock after the process starts, so this overstates the delay.
        delay = time.monotonic() - (started + XID_AT_S)
        assert delay <= 10.0, f"tainted {delay:.1f} s after the XID"
        status = _status(api, FAULTY)
        assert status["health"] == "Lost"
        assert status["gpus"][3]["health"] == "Lost"
        assert any("XID 79" in r or "bus" in r for r in status["gpus"][3]["reasons"])
        cond = _condition(api, FAULTY)
        assert (cond["status"], cond["reason"]) == ("False", "GPULost")
        wait_for("the taint to clear", lambda: TAINT_KEY not in _taints(api, FAULTY), timeout=40)
        assert time.monotonic() - started >= XID_AT_S + XID_FOR_S  # not before the GPU is back
        wait_for("Healthy again", partial(_healthy, api, FAULTY))
        assert _condition(api, FAULTY)["status"] == "True"
