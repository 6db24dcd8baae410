"""Identities the local mesh's processes run under, as the charts give them in a real cluster.

On a real node the kubelet mounts each agent pod a projected ServiceAccount token bound to
that pod; the API server then knows the request comes from that pod on that node
(``authentication.kubernetes.io/node-name`` in the user's extra info), and the agent
admission policy holds it to its own node. kwok runs no kubelet and no containers, so the
harness asks the API server for the same token (TokenRequest with the pod as bound
object) and hands the local process a kubeconfig holding it.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from testbed.cluster import write_private

TOKEN_SECONDS = 7 * 24 * 3600
"""Long enough for a week-long dev session (`make up` again issues new ones); a kubelet
would rotate a projected token hourly, and the agent re-reads it in a pod."""


def service_account_token(
    api: client.ApiClient, namespace: str, service_account: str, pod: Any = None
) -> str:
    """A token for ``service_account``: bound to ``pod`` (a V1Pod), as a projected volume
    has it, or to nothing (the operator's, in the dev mesh)."""
    spec: dict[str, Any] = {"expirationSeconds": TOKEN_SECONDS}
    if pod is not None:
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        }
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    core: Any = client.CoreV1Api(api)
    answer = core.create_namespaced_service_account_token(service_account, namespace, request)
    return str(answer.status.token)


def write_token_kubeconfig(admin_kubeconfig: Path, token: str, path: Path, user: str) -> Path:
    """A kubeconfig for the same API server as ``admin_kubeconfig`` that presents ``token``
    (and nothing of the admin's credentials). Owner-only: it holds a credential."""
    admin: dict[str, Any] = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    server = cluster["server"]
    ca = (
        cluster.get("certificate-authority-data")
        or base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
    )
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "gpumesh", "cluster": {"server": server, "certificate-authority-data": ca}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "gpumesh", "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, yaml.safe_dump(doc))
    return path
