"""A supplier's agent token, stolen or misused, against the real API server.

The charts are installed as a mesh operator installs them; the attacker holds the token
the kubelet would mount into homelab-swarm's agent pod on homelab-3090-0 (an unverified
home rig, bound to that pod), and
tries, through the agent's own HTTP client, every write a supplier could use against
another supplier, the mesh or the control plane. Each must be refused by the API server,
RBAC or the agent admission policy, with the policy's own words; the same agent's own
writes must all succeed. The run writes its table of attempts into docs/security.md.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from kubernetes import client
from kubernetes.config import new_client_from_config

from gpumesh.api.nodes import SUPPLIER_TAINT, agent_account, lease_name
from gpumesh.node_agent.kube import KubeError, RestKubeApi
from testbed import identity, install, mesh
from testbed.testing import KubeTarget

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SECURITY_DOC = ROOT / "docs" / "security.md"
TABLE_BEGIN = "<!-- attacks: written by e2e/test_agent_identity.py -->"
TABLE_END = "<!-- attacks: end -->"

ME, MY_SUPPLIER = "homelab-3090-0", "homelab-swarm"
VICTIM, VICTIM_SUPPLIER = "nordic-a100-0", "nordic-dc"
NS = install.NAMESPACE
GPUNODES = "/apis/gpumesh.io/v1alpha1/gpunodes"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
KEY_A = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

Outcome = Literal["allowed", "policy", "rbac", "error"]


@dataclass(frozen=True)
class Attempt:
    """One request the attacker makes, and how the API server must answer it."""

    what: str
    method: str
    path: str
    body: Any = None
    content_type: str = "application/json"
    expect: Outcome = "policy"
    says: str = ""
    """Words the refusal must contain (the policy's message, or RBAC's)."""


def gpunode(name: str, supplier: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpumesh.io/v1alpha1",
        "kind": "GPUNode",
        "metadata": {"name": name},
        "spec": {"supplier": supplier, "region": "eu-north", "pricePerGpuHour": "0.35", **spec},
    }


def lease(name: str, holder: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 40},
    }


def status(**fields: Any) -> dict[str, Any]:
    return {"status": fields}


def condition(type_: str, value: str) -> dict[str, Any]:
    return {
        "status": {
            "conditions": [{"type": type_, "status": value, "reason": "E2E", "message": "attack"}]
        }
    }


BOUND = f"this agent's token is bound to node {ME}"
FIXED = "is fixed when the GPUNode is created: only the mesh operator may change it"
LABELS = "its own gpumesh.io/ and nvidia.com/ labels, never the mesh operator's; refused"
TAINTS = "its own gpumesh.io/ and nvidia.com/ taints, never the mesh operator's; refused"
RBAC = "cannot"
ME_GN, VICTIM_GN = f"{GPUNODES}/{ME}", f"{GPUNODES}/{VICTIM}"
ME_NODE, VICTIM_NODE = f"/api/v1/nodes/{ME}", f"/api/v1/nodes/{VICTIM}"

ATTEMPTS: tuple[Attempt, ...] = (
    # --- GPUNodes: creating --------------------------------------------------------------------
    Attempt(
        "create the GPUNode of another supplier's node",
        "POST",
        GPUNODES,
        gpunode(VICTIM, MY_SUPPLIER),
        says=f"{BOUND}; it may not write GPUNode {VICTIM}",
    ),
    Attempt(
        "add a phantom mesh member or relay (a GPUNode for no node of mine)",
        "POST",
        GPUNODES,
        gpunode("phantom-relay", MY_SUPPLIER, publicEndpoint="203.0.113.7:51820"),
        says=f"{BOUND}; it may not write GPUNode phantom-relay",
    ),
    Attempt(
        "create my own GPUNode in another supplier's name",
        "POST",
        GPUNODES,
        gpunode(ME, VICTIM_SUPPLIER),
        says=f"this agent belongs to supplier {MY_SUPPLIER}; it may not create a GPUNode with "
        f"spec.supplier {VICTIM_SUPPLIER}",
    ),
    Attempt(
        "create my own GPUNode with labels (to join a mesh selector)",
        "POST",
        GPUNODES,
        {**gpunode(ME, MY_SUPPLIER), "metadata": {"name": ME, "labels": {"gpumesh.io/x": "y"}}},
        says="metadata.labels and annotations of a GPUNode are the mesh operator's",
    ),
    Attempt("create my own GPUNode", "POST", GPUNODES, gpunode(ME, MY_SUPPLIER), expect="allowed"),
    # --- GPUNodes: my own spec -----------------------------------------------------------------
    Attempt(
        "move my node to another supplier (redirect its earnings)",
        "PATCH",
        ME_GN,
        {"spec": {"supplier": VICTIM_SUPPLIER}},
        MERGE,
        says=f"spec.supplier {FIXED}",
    ),
    Attempt(
        "move my node to another region",
        "PATCH",
        ME_GN,
        {"spec": {"region": "us-east"}},
        MERGE,
        says=f"spec.region {FIXED}",
    ),
    Attempt(
        "declare my node head-capable",
        "PATCH",
        ME_GN,
        {"spec": {"headCapable": True}},
        MERGE,
        says=f"spec.headCapable {FIXED}",
    ),
    Attempt(
        "change whether my node relays others' traffic",
        "PATCH",
        ME_GN,
        {"spec": {"meshRelay": False}},
        MERGE,
        says=f"spec.meshRelay {FIXED}",
    ),
    Attempt(
        "label my GPUNode",
        "PATCH",
        ME_GN,
        {"metadata": {"labels": {"gpumesh.io/mesh-e2e": "x"}}},
        MERGE,
        says="metadata.labels of a GPUNode",
    ),
    Attempt(
        "change my price", "PATCH", ME_GN, {"spec": {"pricePerGpuHour": "2.99"}}, MERGE, "allowed"
    ),
    # --- GPUNodes: my own status ---------------------------------------------------------------
    Attempt(
        "report my GPUs, health and mesh key",
        "PATCH",
        f"{ME_GN}/status",
        status(
            health="Healthy",
            gpuCount=8,
            mesh={"publicKey": KEY_A, "endpoints": ["198.51.100.9:51820"]},
        ),
        MERGE,
        "allowed",
    ),
    Attempt(
        "grade my own proof of GPU",
        "PATCH",
        f"{ME_GN}/status",
        status(verification={"result": "Passed", "reason": "Verified"}),
        MERGE,
        says="status.verification is the operator's",
    ),
    Attempt(
        "set my own challenge (one I answered before)",
        "PATCH",
        f"{ME_GN}/status",
        status(
            challenge={
                "id": "0123456789abcdef",
                "seed": "ab" * 32,
                "issuedTime": "2026-01-01T00:00:00Z",
                "deadlineSeconds": 3600,
            }
        ),
        MERGE,
        says="status.challenge is the operator's",
    ),
    Attempt(
        "give myself the best reputation",
        "PATCH",
        f"{ME_GN}/status",
        status(reputation=1.0),
        MERGE,
        says="status.reputation is the operator's",
    ),
    Attempt(
        "pick my own overlay address",
        "PATCH",
        f"{ME_GN}/status",
        status(mesh={"overlayIp": "10.90.0.1"}),
        MERGE,
        says="status.mesh.overlayIp is assigned by the operator",
    ),
    Attempt(
        "pick my own relay",
        "PATCH",
        f"{ME_GN}/status",
        status(mesh={"relay": VICTIM}),
        MERGE,
        says="status.mesh.relay is assigned by the operator",
    ),
    Attempt(
        "write the operator's conditions on my GPUNode",
        "PATCH",
        f"{ME_GN}/status",
        status(conditions=[{"type": "Verified", "status": "True"}]),
        MERGE,
        says="status.conditions is the operator's",
    ),
    # --- GPUNodes: another supplier's -------------------------------------------------------
    Attempt(
        "mark a rival's node Lost",
        "PATCH",
        f"{VICTIM_GN}/status",
        status(health="Lost"),
        MERGE,
        says=f"{BOUND}; it may not write GPUNode {VICTIM}",
    ),
    Attempt(
        "replace a rival's mesh key (and read renters' traffic)",
        "PATCH",
        f"{VICTIM_GN}/status",
        status(mesh={"publicKey": KEY_A, "endpoints": ["198.51.100.9:51820"]}),
        MERGE,
        says=f"{BOUND}; it may not write GPUNode {VICTIM}",
    ),
    Attempt(
        "raise a rival's price",
        "PATCH",
        VICTIM_GN,
        {"spec": {"pricePerGpuHour": "99"}},
        MERGE,
        says=f"{BOUND}; it may not write GPUNode {VICTIM}",
    ),
    Attempt(
        "take a rival's node and its earnings",
        "PATCH",
        VICTIM_GN,
        {"spec": {"supplier": MY_SUPPLIER}},
        MERGE,
        says=f"{BOUND}; it may not write GPUNode {VICTIM}",
    ),
    Attempt("delete a rival's GPUNode", "DELETE", VICTIM_GN, expect="rbac", says=RBAC),
    Attempt("delete my own GPUNode", "DELETE", ME_GN, expect="rbac", says=RBAC),
    # --- Nodes ---------------------------------------------------------------------------------
    Attempt(
        "label my node verified",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"gpumesh.io/verified": "true"}}},
        MERGE,
        says=f"{LABELS}: gpumesh.io/verified",
    ),
    Attempt(
        "label my node another supplier's",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"gpumesh.io/supplier": VICTIM_SUPPLIER}}},
        MERGE,
        says=f"{LABELS}: gpumesh.io/supplier",
    ),
    Attempt(
        "label my node head-capable",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"gpumesh.io/head-capable": "true"}}},
        MERGE,
        says=f"{LABELS}: gpumesh.io/head-capable",
    ),
    Attempt(
        "label my node a relay",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"gpumesh.io/mesh-relay": "true"}}},
        MERGE,
        says=f"{LABELS}: gpumesh.io/mesh-relay",
    ),
    Attempt(
        "rename my node's hostname label",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"kubernetes.io/hostname": VICTIM}}},
        MERGE,
        says=f"{LABELS}: kubernetes.io/hostname",
    ),
    Attempt(
        "make my node a control-plane node",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}},
        MERGE,
        says=f"{LABELS}: node-role.kubernetes.io/control-plane",
    ),
    Attempt(
        "label my node's GPUs",
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}},
        MERGE,
        "allowed",
    ),
    Attempt(
        "label a rival's node's GPUs",
        "PATCH",
        VICTIM_NODE,
        {"metadata": {"labels": {"nvidia.com/gpu.product": "NVIDIA-GeForce-GT-710"}}},
        MERGE,
        says=f"{BOUND}; it may not write Node {VICTIM}",
    ),
    Attempt(
        "annotate my node",
        "PATCH",
        ME_NODE,
        {"metadata": {"annotations": {"e2e": "x"}}},
        MERGE,
        says="metadata.annotations of a Node",
    ),
    Attempt(
        "cordon my node behind the control plane's back",
        "PATCH",
        ME_NODE,
        {"spec": {"unschedulable": True}},
        MERGE,
        says="spec.unschedulable of a Node",
    ),
    Attempt(
        "taint my node with a foreign key",
        "PATCH",
        ME_NODE,
        {
            "spec": {
                "taints": [
                    {"key": SUPPLIER_TAINT, "value": MY_SUPPLIER, "effect": "NoSchedule"},
                    {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
                ]
            }
        },
        MERGE,
        says=f"{TAINTS}: dedicated",
    ),
    Attempt(
        "remove the taint the mesh operator reserved my node with",
        "PATCH",
        ME_NODE,
        {"spec": {"taints": []}},
        MERGE,
        says=f"{TAINTS}: {SUPPLIER_TAINT}",
    ),
    Attempt(
        "taint my node GPU-unhealthy",
        "PATCH",
        ME_NODE,
        {
            "spec": {
                "taints": [
                    {"key": SUPPLIER_TAINT, "value": MY_SUPPLIER, "effect": "NoSchedule"},
                    {"key": "gpumesh.io/gpu-unhealthy", "value": "true", "effect": "NoSchedule"},
                ]
            }
        },
        MERGE,
        "allowed",
    ),
    Attempt(
        "taint a rival's node GPU-unhealthy",
        "PATCH",
        VICTIM_NODE,
        {"spec": {"taints": [{"key": "gpumesh.io/gpu-unhealthy", "effect": "NoSchedule"}]}},
        MERGE,
        says=f"{BOUND}; it may not write Node {VICTIM}",
    ),
    Attempt(
        "claim 64 GPUs in my node's capacity",
        "PATCH",
        f"{ME_NODE}/status",
        {"status": {"capacity": {"nvidia.com/gpu": "64"}, "allocatable": {"nvidia.com/gpu": "64"}}},
        STRATEGIC,
        says="status.capacity of a Node",
    ),
    Attempt(
        "mark my node NotReady",
        "PATCH",
        f"{ME_NODE}/status",
        condition("Ready", "False"),
        STRATEGIC,
        says="may write only the GPUHealthy condition",
    ),
    Attempt(
        "report my GPUs' health condition",
        "PATCH",
        f"{ME_NODE}/status",
        condition("GPUHealthy", "True"),
        STRATEGIC,
        "allowed",
    ),
    Attempt(
        "report a rival's GPUs unhealthy",
        "PATCH",
        f"{VICTIM_NODE}/status",
        condition("GPUHealthy", "False"),
        STRATEGIC,
        says=f"{BOUND}; it may not write Node {VICTIM}",
    ),
    # --- Leases --------------------------------------------------------------------------------
    Attempt("take my heartbeat Lease", "POST", LEASES, lease(lease_name(ME), ME), expect="allowed"),
    Attempt(
        "renew my heartbeat Lease",
        "PATCH",
        f"{LEASES}/{lease_name(ME)}",
        {"spec": {"leaseDurationSeconds": 41}},
        MERGE,
        "allowed",
    ),
    Attempt(
        "hand my Lease to a rival's node",
        "PATCH",
        f"{LEASES}/{lease_name(ME)}",
        {"spec": {"holderIdentity": VICTIM}},
        MERGE,
        says="an agent's Lease names its own node as holder",
    ),
    Attempt(
        "keep a dead rival alive (renew its heartbeat)",
        "PATCH",
        f"{LEASES}/{lease_name(VICTIM)}",
        {"spec": {"leaseDurationSeconds": 3600}},
        MERGE,
        says=f"its Lease is {lease_name(ME)}, not {lease_name(VICTIM)}",
    ),
    Attempt(
        "take the operator's Lease",
        "POST",
        LEASES,
        lease("gpumesh-operator-e2e", ME),
        says=f"its Lease is {lease_name(ME)}, not gpumesh-operator-e2e",
    ),
    Attempt(
        "write kube-system's leader election",
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
        lease("kube-scheduler", ME),
        expect="rbac",
        says=RBAC,
    ),
    Attempt(
        "delete a rival's heartbeat Lease",
        "DELETE",
        f"{LEASES}/{lease_name(VICTIM)}",
        expect="rbac",
        says=RBAC,
    ),
    # --- everything else ---------------------------------------------------------------------
    Attempt(
        "evict a pod on a rival's node",
        "POST",
        f"/api/v1/namespaces/{NS}/pods/VICTIM_POD/eviction",
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "VICTIM_POD"}},
        expect="rbac",
        says=RBAC,
    ),
    Attempt("list every pod", "GET", "/api/v1/pods", expect="rbac", says=RBAC),
    Attempt("read secrets", "GET", f"/api/v1/namespaces/{NS}/secrets", expect="rbac", says=RBAC),
    Attempt(
        "rewrite the mesh catalogue",
        "PATCH",
        f"/api/v1/namespaces/{NS}/configmaps/gpumesh-mesh",
        {"data": {"x": "y"}},
        MERGE,
        expect="rbac",
        says=RBAC,
    ),
    Attempt(
        "run a pod of my own",
        "POST",
        f"/api/v1/namespaces/{NS}/pods",
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}},
        expect="rbac",
        says=RBAC,
    ),
    Attempt(
        "grant myself more rights",
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding"},
        expect="rbac",
        says=RBAC,
    ),
)
UNBOUND = Attempt(
    "report into my GPUNode with a token not bound to a pod",
    "PATCH",
    f"{ME_GN}/status",
    status(health="Healthy"),
    MERGE,
    says="must be bound to its pod",
)


@dataclass(frozen=True)
class Result:
    attempt: Attempt
    outcome: Outcome
    message: str


@pytest.fixture(scope="module")
def agent(kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestKubeApi]:
    """atlas-h100-0's agent client, on the token its pod would have; the stage set."""
    if kube.fleet is None:
        pytest.skip("external cluster: no simulated fleet, so no supplier pods to bind to")
    api = kube.api
    mesh.apply_crds(api)
    mesh.ensure_namespace(api, NS)
    install.install_operator_chart(kube.kubeconfig)
    install.install_supplier_charts(kube.kubeconfig, kube.fleet, prune=False)
    pods = install.agent_pods(api, {ME: MY_SUPPLIER, VICTIM: VICTIM_SUPPLIER})
    admin = RestKubeApi(api)
    labels = dict(((admin.get(ME_NODE) or {}).get("metadata") or {}).get("labels") or {})
    made = _stage(admin)
    home = tmp_path_factory.mktemp("identity")
    config = install.agent_kubeconfig(api, kube.kubeconfig, MY_SUPPLIER, pods[ME], home)
    agent = RestKubeApi.connect(str(config))
    assert agent is not None
    try:
        yield agent
    finally:
        _unstage(admin, labels, made)


def _stage(admin: RestKubeApi) -> list[str]:
    """A victim with a GPUNode and a Lease; me with no GPUNode yet, and reserved.
    Returns what was made here for the victim, to be removed afterwards."""
    made = [ME_GN, f"{LEASES}/{lease_name(ME)}"]
    for path in made:
        with contextlib.suppress(KubeError):
            admin.request("DELETE", path)
    if admin.get(VICTIM_GN) is None:
        admin.request("POST", GPUNODES, gpunode(VICTIM, VICTIM_SUPPLIER, pricePerGpuHour="1.29"))
        made.append(VICTIM_GN)
    if admin.get(f"{LEASES}/{lease_name(VICTIM)}") is None:
        admin.request("POST", LEASES, lease(lease_name(VICTIM), VICTIM))
        made.append(f"{LEASES}/{lease_name(VICTIM)}")
    reserved = [{"key": SUPPLIER_TAINT, "value": MY_SUPPLIER, "effect": "NoSchedule"}]
    admin.request("PATCH", ME_NODE, {"spec": {"taints": reserved}}, content_type=MERGE)
    return made


def _unstage(admin: RestKubeApi, labels: dict[str, str], made: list[str]) -> None:
    """Put things back as they were: later tests place work by these nodes and offers."""
    now = ((admin.get(ME_NODE) or {}).get("metadata") or {}).get("labels") or {}
    restore: dict[str, str | None] = {k: None for k in now if k not in labels}
    restore.update(labels)
    admin.request(
        "PATCH",
        ME_NODE,
        {"metadata": {"labels": restore}, "spec": {"taints": None}},
        content_type=MERGE,
    )
    for path in made:
        with contextlib.suppress(KubeError):
            admin.request("DELETE", path)


def attempt(api: RestKubeApi, attempt: Attempt, victim_pod: str) -> Result:
    path = attempt.path.replace("VICTIM_POD", victim_pod)
    body = attempt.body
    if isinstance(body, dict) and body.get("kind") == "Eviction":
        body = {**body, "metadata": {"name": victim_pod}}
    try:
        api.request(attempt.method, path, body, content_type=attempt.content_type)
    except KubeError as err:
        if err.status == 403 and "ValidatingAdmissionPolicy" in err.detail:
            return Result(attempt, "policy", err.detail)
        if err.status == 403:
            return Result(attempt, "rbac", err.detail)
        return Result(attempt, "error", f"{err.status}: {err.detail}")  # neither: a test bug
    return Result(attempt, "allowed", "")


def test_an_agent_token_can_write_its_own_node_and_nothing_else(
    kube: KubeTarget, agent: RestKubeApi
) -> None:
    victim_pod = install.agent_pods(kube.api, {VICTIM: VICTIM_SUPPLIER})[VICTIM].metadata.name
    results = [attempt(agent, a, victim_pod) for a in ATTEMPTS]
    token = identity.service_account_token(kube.api, NS, agent_account(MY_SUPPLIER))
    unbound_config = identity.write_token_kubeconfig(
        kube.kubeconfig, token, Path(kube.kubeconfig).parent / "unbound-agent.yaml", "unbound"
    )
    unbound = RestKubeApi.connect(str(unbound_config))
    assert unbound is not None
    results.append(attempt(unbound, UNBOUND, victim_pod))
    _write_table(results)

    wrong = [
        f"{r.attempt.what}: expected {r.attempt.expect}, got {r.outcome}: {_reason(r.message)}"
        for r in results
        if r.outcome != r.attempt.expect
        or (r.attempt.expect != "allowed" and r.attempt.says not in _unescaped(r.message))
    ]
    assert not wrong, "\n".join(wrong)
    refused = [r for r in results if r.attempt.expect != "allowed"]
    assert len(refused) >= 25


def _unescaped(message: str) -> str:
    return message.replace('\\"', '"').replace("\\'", "'")


def _reason(message: str) -> str:
    """The part of a refusal a person reads."""
    text = _unescaped(message)
    found = re.search(r'"message":"(.*?)","reason"', text)
    text = found.group(1) if found else text
    text = re.sub(r"^.*denied request: ", "", text)
    rbac = re.search(r"(cannot .*)$", text)
    return rbac.group(1) if rbac else text


def _write_table(results: list[Result]) -> None:
    rows = [
        "| # | what the attacker tries | outcome | the API server's answer |",
        "|---|---|---|---|",
    ]
    word = {
        "allowed": "allowed (its own)",
        "policy": "refused: policy",
        "rbac": "refused: RBAC",
        "error": "error",
    }
    for n, r in enumerate(results, 1):
        reason = _reason(r.message).replace("|", "\\|") if r.message else ""
        rows.append(f"| {n} | {r.attempt.what} | {word[r.outcome]} | {reason} |")
    table = "\n".join(rows)
    text = SECURITY_DOC.read_text()
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END)
    SECURITY_DOC.write_text(text[: start + len(TABLE_BEGIN)] + "\n" + table + "\n" + text[end:])


CAN_I_BEGIN = "<!-- can-i: written by e2e/test_agent_identity.py -->"
CAN_I_END = "<!-- can-i: end -->"


@dataclass(frozen=True)
class Access:
    """One `kubectl auth can-i` question, and the answers each identity must get."""

    verb: str
    resource: str
    namespace: str = ""
    name: str = ""
    agent: bool = False
    operator: bool = False

    @property
    def question(self) -> str:
        where = f" -n {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.resource}{'/' + self.name if self.name else ''}{where}"


MATRIX: tuple[Access, ...] = (
    Access("create", "gpunodes.gpumesh.io", agent=True),
    Access("patch", "gpunodes.gpumesh.io/status", agent=True, operator=True),
    Access("delete", "gpunodes.gpumesh.io"),
    Access("patch", "nodes", agent=True),
    Access("patch", "nodes/status", agent=True),
    Access("list", "nodes", operator=True),
    Access("patch", "leases.coordination.k8s.io", NS, agent=True),
    Access("update", "leases.coordination.k8s.io", NS, agent=True, operator=True),
    Access("patch", "leases.coordination.k8s.io", "kube-system"),
    Access("get", "configmaps", NS, "gpumesh-mesh", agent=True, operator=True),
    Access("patch", "configmaps", NS, "gpumesh-mesh", operator=True),
    Access("list", "pods", agent=False, operator=True),
    Access("create", "pods/eviction", NS),
    Access("delete", "pods", "default"),
    Access("get", "secrets", NS),
    Access("patch", "rayclusters.ray.io", "default", operator=True),
    Access("patch", "gpuclusters.gpumesh.io/status", "default", operator=True),
    Access("create", "gpuclusters.gpumesh.io", "default"),
    Access("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    Access("create", "validatingadmissionpolicies.admissionregistration.k8s.io"),
)


def _allowed(api: Any, access: Access) -> bool:
    resource, _, subresource = access.resource.partition("/")
    name, _, group = resource.partition(".")
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "verb": access.verb,
                "group": group,
                "resource": name,
                "subresource": subresource,
                "namespace": access.namespace,
                "name": access.name,
            }
        },
    }
    answer = api.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
    return bool(answer["status"].get("allowed"))


def test_what_the_agent_and_the_operator_identities_may_do(
    kube: KubeTarget, agent: RestKubeApi, tmp_path: Path
) -> None:
    operator_config = install.operator_kubeconfig(kube.api, kube.kubeconfig, tmp_path)
    operator = RestKubeApi.connect(str(operator_config))
    assert operator is not None
    rows = ["| can-i | agent | operator |", "|---|---|---|"]
    wrong = []
    for access in MATRIX:
        got = (_allowed(agent, access), _allowed(operator, access))
        if got != (access.agent, access.operator):
            wrong.append(f"{access.question}: got {got}, want {(access.agent, access.operator)}")
        rows.append(f"| `{access.question}` | {_yes(got[0])} | {_yes(got[1])} |")
    text = SECURITY_DOC.read_text()
    start, end = text.index(CAN_I_BEGIN), text.index(CAN_I_END)
    table = "\n".join(rows)
    SECURITY_DOC.write_text(text[: start + len(CAN_I_BEGIN)] + "\n" + table + "\n" + text[end:])
    assert not wrong, "\n".join(wrong)


def _yes(allowed: bool) -> str:
    return "yes" if allowed else "no"


def _flow_schema_of(admin: Any, kubeconfig: Path) -> str:
    """The name of the FlowSchema the API server put this identity's request in."""
    api: Any = new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        _, url, headers, body, _ = api.param_serialize(
            method="GET",
            resource_path="/version",
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = api.call_api("GET", url, header_params=headers, body=body)
        uid = response.getheader("X-Kubernetes-PF-FlowSchema-UID")
    finally:
        api.close()
    schemas: Any = client.FlowcontrolApiserverV1Api(admin).list_flow_schema()
    return str(next(s.metadata.name for s in schemas.items if s.metadata.uid == uid))


def test_agents_queue_apart_from_the_operator_and_the_control_plane(
    kube: KubeTarget, agent: RestKubeApi, tmp_path: Path
) -> None:
    pods = install.agent_pods(kube.api, {ME: MY_SUPPLIER})
    mine = install.agent_kubeconfig(kube.api, kube.kubeconfig, MY_SUPPLIER, pods[ME], tmp_path)
    operator = install.operator_kubeconfig(kube.api, kube.kubeconfig, tmp_path)
    assert _flow_schema_of(kube.api, mine) == "gpumesh-agents"
    assert _flow_schema_of(kube.api, operator) == "gpumesh-operator"
