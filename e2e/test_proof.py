"""Proof of GPU on the real control plane: the shipped operator challenges the agents the
example fleet's nodes run, honest nodes pass, and each way of cheating the fleet declares
(``cheat:``) is caught and named.

The dev operator asks for small products (``DEV_OPERATOR_ENV``): the agents compute them
with NumPy, so what runs here is the protocol (commitment, sampling, timing, replay,
binding to node and GPU), not a GPU's speed; ``make test-gpu`` runs the products on a card.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpumesh.api.proof import gpus_fingerprint
from testbed.testing import (
    KubeTarget,
    OperatedMesh,
    operated_mesh,
    steady_fleet,
    wait_for,
)

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
GROUP, VERSION = "gpumesh.io", "v1alpha1"
RETRY_S = 5
CHEATS = {
    "homelab-4090-0": ("WrongAnswer", "WrongAnswer"),
    "homelab-4090-1": ("TooSlow", "Late"),
    "homelab-3090-0": ("SelfGraded", "Unanswered"),
    "homelab-3090-1": ("SmallVram", "WrongAnswer"),
}
"""Each homelab node's cheat (examples/fleet.yaml) and the reason the operator must give."""


@pytest.fixture(scope="module")
def world(kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatedMesh]:
    if kube.fleet is None:
        pytest.skip("this cluster has no simulated fleet for agents to play")
    tmp = tmp_path_factory.mktemp("proof")
    env = {"GPUMESH_PROOF_RETRY_SECONDS": RETRY_S}
    with operated_mesh(kube, tmp, FLEET, (), operator_env=env) as mesh:
        yield mesh


def gpunode(api: client.ApiClient, node: str) -> dict[str, Any]:
    custom: Any = client.CustomObjectsApi(api)
    found: dict[str, Any] = custom.get_cluster_custom_object(GROUP, VERSION, "gpunodes", node)
    return found


def verified(api: client.ApiClient, node: str) -> dict[str, Any] | None:
    """The node's Verified condition when it is True (None too while the GPUNode is gone)."""
    try:
        status = gpunode(api, node).get("status") or {}
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    for c in status.get("conditions") or []:
        if c["type"] == "Verified" and c["status"] == "True":
            return dict(c)
    return None


def failed_with(api: client.ApiClient, node: str, reason: str) -> dict[str, Any] | None:
    verdict = (gpunode(api, node).get("status") or {}).get("verification") or {}
    return verdict if (verdict.get("result"), verdict.get("reason")) == ("Failed", reason) else None


def fleet_variant(mesh: OperatedMesh, tmp: Path, node: str, **changes: Any) -> Path:
    """The steady example fleet with ``node`` changed, readable by the agents' user."""
    doc = yaml.safe_load(steady_fleet(FLEET, tmp / "steady.yaml").read_text())
    for supplier in doc["suppliers"]:
        for n in supplier["nodes"]:
            if n["name"] == node:
                n.update(changes)
    path = tmp / f"fleet-{node}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return mesh.share(path)


def test_an_honest_node_is_verified_within_30_s_of_joining(world: OperatedMesh) -> None:
    """The GPUNode is deleted and its agent creates it again, as on a first join."""
    node, api = "pacific-4090-0", world.api
    client.CustomObjectsApi(api).delete_cluster_custom_object(GROUP, VERSION, "gpunodes", node)
    joined = time.monotonic()
    condition = wait_for(f"{node} verified again", lambda: verified(api, node), timeout=30)
    status = gpunode(api, node)["status"]
    created = datetime.fromisoformat(gpunode(api, node)["metadata"]["creationTimestamp"])
    since = datetime.fromisoformat(condition["lastTransitionTime"]) - created
    print(f"{node}: verified {since.total_seconds():.1f} s after its GPUNode was created")
    assert since.total_seconds() <= 30 and time.monotonic() - joined <= 30
    verdict = status["verification"]
    assert verdict["challengeId"] == status["challenge"]["id"]
    assert len(status["challenge"]["samples"]) == 16 * len(status["gpus"])
    assert proven(status)


def test_each_cheat_stays_unverified_with_a_condition_that_names_why(world: OperatedMesh) -> None:
    api = world.api
    for node, (_cheat, reason) in CHEATS.items():
        wait_for(f"{node} failed as {reason}", partial(failed_with, api, node, reason))
    first = {n: gpunode(api, n)["status"]["verification"]["challengeId"] for n in CHEATS}
    # Challenged again after the retry time, they fail again, each challenge counted once.
    for node, (_cheat, reason) in CHEATS.items():

        def failed_again(n: str = node, r: str = reason) -> dict[str, Any] | None:
            verdict = failed_with(api, n, r)
            return verdict if verdict and verdict["challengeId"] != first[n] else None

        wait_for(f"{node} failed a second challenge", failed_again, timeout=90)
    for node, (cheat, reason) in CHEATS.items():

        def named(n: str = node, r: str = reason) -> dict[str, Any] | None:
            status = gpunode(api, n)["status"]
            condition = next(c for c in status["conditions"] if c["type"] == "Verified")
            return status if (condition["status"], condition["reason"]) == ("False", r) else None

        status = wait_for(f"{node}'s Verified condition False, {reason}", named)
        assert status["track"]["failedChallenges"] > 1.5, (node, cheat, status["track"])
    log = (world.logs / "agent-homelab-3090-0.log").read_text()
    assert "the API server refused my own Passed verdict" in log
    assert "status.verification is the operator's" in log


def test_an_answer_copied_from_another_node_is_a_replay(
    world: OperatedMesh, tmp_path: Path
) -> None:
    node, api = "homelab-4090-0", world.api
    world.start_agent(node, f"--fake-nvml={fleet_variant(world, tmp_path, node, cheat='Replay')}")
    try:
        verdict = wait_for(f"{node} caught replaying", lambda: failed_with(api, node, "Replay"))
        assert "'s, to its challenge" in verdict["message"]
        assert verified(api, node) is None
    finally:
        world.start_agent(node)


def test_cheaters_get_no_verified_only_work(world: OperatedMesh) -> None:
    """Five RTX 4090s, verified only: the honest lab has four, the cheating homelab three
    more, so the cluster waits and says the unverified ones were left out."""
    api = world.api
    namespace = "e2e-proof"
    core: Any = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    custom: Any = client.CustomObjectsApi(api)
    try:
        spec = {
            "workers": {"gpu": {"models": ["RTX 4090"]}, "gpusPerWorker": 1, "replicas": 5},
            "placement": {"verifiedOnly": True},
        }
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "GPUCluster",
            "metadata": {"name": "want-verified"},
            "spec": spec,
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "gpuclusters", body)

        def waiting() -> str | None:
            obj = custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "gpuclusters", "want-verified"
            )
            for c in (obj.get("status") or {}).get("conditions") or []:
                if (c["type"], c["status"], c["reason"]) == ("Stalled", "True", "Unschedulable"):
                    return str(c["message"])
            return None

        message = wait_for("the cluster to wait for verified GPUs", waiting, timeout=60)
        assert "unverified 3" in message, message
    finally:
        core.delete_namespace(namespace)


def test_a_node_whose_gpus_change_loses_its_verdict_until_they_pass_again(
    world: OperatedMesh, tmp_path: Path
) -> None:
    node, api = "atlas-h100-0", world.api
    before = gpunode(api, node)["status"]
    assert verified(api, node) is not None
    changed_at = datetime.now().astimezone()
    world.start_agent(node, f"--fake-nvml={fleet_variant(world, tmp_path, node, gpuCount=4)}")
    try:

        def passed_on_four() -> dict[str, Any] | None:
            status = gpunode(api, node)["status"]
            fresh = (status.get("verification") or {}).get("challengeId") != before["verification"][
                "challengeId"
            ]
            return status if len(status["gpus"]) == 4 and proven(status) and fresh else None

        status = wait_for(f"{node} verified on its 4 GPUs", passed_on_four, timeout=30)
        condition = next(c for c in status["conditions"] if c["type"] == "Verified")
        # True again, and True since after the change: it was False in between.
        assert datetime.fromisoformat(condition["lastTransitionTime"]) >= changed_at.replace(
            microsecond=0
        )
    finally:
        world.start_agent(node)
        wait_for(f"{node} verified on its 8 GPUs again", lambda: _on_eight(api, node), timeout=30)


def _on_eight(api: client.ApiClient, node: str) -> bool:
    status = gpunode(api, node)["status"]
    return len(status["gpus"]) == 8 and proven(status)


def proven(status: dict[str, Any]) -> bool:
    """A Passed verdict about the very GPUs the node reports now (what placement asks)."""
    verdict = status.get("verification") or {}
    gpus = [(g["uuid"], g["model"], g["memoryMib"]) for g in status["gpus"]]
    return verdict.get("result") == "Passed" and verdict.get("gpus") == gpus_fingerprint(gpus)
