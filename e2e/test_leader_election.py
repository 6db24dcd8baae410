"""Two operator replicas on the real control plane: one leads, the other stands by and
takes over when the leader is SIGKILLed, with nothing duplicated; a clean stop hands over
at once.

The chart's defaults (Lease 8 s, renewed every 1 s): a standby may take the Lease only once
it has seen it unrenewed for 8 s on its own clock, so a takeover after SIGKILL takes 8 to
10 s, plus the new leader's start (listing what it watches).
"""

from __future__ import annotations

import contextlib
import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpumesh.operator.settings import OperatorSettings
from testbed.testing import KubeTarget, OperatedMesh, find_custom, operated_mesh, wait_for

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
NS = "e2e-leader"
GROUP, VERSION = "gpumesh.io", "v1alpha1"
LEASE = "gpumesh-operator"
SYSTEM = OperatorSettings().namespace
DEFAULTS = OperatorSettings()
SPEC: dict[str, Any] = {"workers": {"gpu": {"models": ["RTX 4090"]}, "replicas": 1}}


@pytest.fixture(scope="module")
def replicated(
    kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatedMesh]:
    if kube.fleet is None:
        pytest.skip("this cluster has no simulated fleet for agents to play")
    with operated_mesh(kube, tmp_path_factory.mktemp("mesh"), FLEET, (NS,)) as world:
        try:
            yield world
        finally:  # give the GPUs back: later modules count on the whole fleet
            custom: Any = client.CustomObjectsApi(world.api)
            for name in ("before", "after"):
                with contextlib.suppress(ApiException):
                    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "gpuclusters", name)
            wait_for("the test's RayClusters gone", lambda: not rayclusters(world.api))


def holder(api: client.ApiClient) -> str:
    lease: Any = client.CoordinationV1Api(api).read_namespaced_lease(LEASE, SYSTEM)
    return str(lease.spec.holder_identity or "")


def health(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def create(api: client.ApiClient, name: str) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUCluster", "metadata": {"name": name}}
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, NS, "gpuclusters", {**body, "spec": SPEC}
    )


def phase(api: client.ApiClient, name: str) -> str | None:
    found = find_custom(api, GROUP, VERSION, NS, "gpuclusters", name)
    return ((found or {}).get("status") or {}).get("phase")


def rayclusters(api: client.ApiClient) -> list[str]:
    found: Any = client.CustomObjectsApi(api).list_namespaced_custom_object(
        "ray.io", "v1", NS, "rayclusters"
    )
    return sorted(item["metadata"]["name"] for item in found["items"])


def test_the_standby_takes_over_from_a_killed_leader_within_the_lease_and_duplicates_nothing(
    replicated: OperatedMesh,
) -> None:
    api = replicated.api
    leader = wait_for("a leader", lambda: holder(api) or None)
    port = replicated.start_replica("operator-b")
    wait_for("the standby's health", lambda: _standby(port))
    status, text = health(port)
    assert status == 200 and f"standby; {leader} leads" in text
    create(api, "before")
    wait_for("GPUCluster before Ready", lambda: phase(api, "before") == "Ready", timeout=120)
    assert holder(api) == leader  # the standby never took it while the leader renewed

    assert replicated.operator is not None
    killed = time.monotonic()
    replicated.kill_operator()
    create(api, "after")
    taken = wait_for("the standby leads", lambda: (holder(api) not in ("", leader)) or None)
    took = time.monotonic() - killed
    wait_for("GPUCluster after Ready", lambda: phase(api, "after") == "Ready", timeout=120)
    ready = time.monotonic() - killed
    print(f"takeover: Lease taken {took:.1f} s after SIGKILL; a new GPUCluster Ready {ready:.1f} s")
    assert taken
    assert took <= DEFAULTS.leader_lease_seconds + 2 * DEFAULTS.leader_retry_seconds + 2.0
    assert health(port)[0] == 200 and "leader" in health(port)[1]
    assert rayclusters(api) == ["after", "before"]
    assert phase(api, "before") == "Ready"


def test_a_cleanly_stopped_leader_hands_over_at_once(replicated: OperatedMesh) -> None:
    api = replicated.api
    replicated.start_replica("operator-c")
    leading = wait_for("a leader", lambda: holder(api) or None)
    processes = {name: proc for name, (proc, _) in replicated.replicas.items()}
    if replicated.operator is not None:
        processes["operator"] = replicated.operator
    name = next(n for n in processes if f"leading as {leading}" in log_of(replicated, n))
    stopped = time.monotonic()
    processes[name].terminate()
    processes[name].wait(30)
    wait_for("another replica leads", lambda: (holder(api) not in ("", leading)) or None)
    took = time.monotonic() - stopped
    print(f"handover after SIGTERM: {took:.1f} s")
    assert took < DEFAULTS.leader_lease_seconds / 2


def _standby(port: int) -> bool:
    try:
        return "standby" in health(port)[1]
    except OSError:
        return False


def log_of(world: OperatedMesh, name: str) -> str:
    return (world.logs / f"{name}.log").read_text()
