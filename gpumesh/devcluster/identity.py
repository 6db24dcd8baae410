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
import os
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

TOKEN_SECONDS = 7 * 24 * 3600
"""Long enough for a week-long dev session (`make up` again issues new ones); a kubelet
would rotate a projected token hourly, and the agent re-reads it in a pod."""


def pod_token(api: client.ApiClient, namespace: str, service_account: str, pod: Any) -> str:
    """A token for ``service_account`` bound to ``pod`` (a V1Pod), as a projected volume has."""
    core: Any = client.CoreV1Api(api)
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": TOKEN_SECONDS,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.metadata.name,
                "uid": pod.metadata.uid,
            },
        },
    }
    answer = core.create_namespaced_service_account_token(service_account, namespace, request)
    return str(answer.status.token)


def service_account_token(api: client.ApiClient, namespace: str, service_account: str) -> str:
    """A token for ``service_account`` bound to nothing (the operator's, in the dev mesh)."""
    core: Any = client.CoreV1Api(api)
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": TOKEN_SECONDS},
    }
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
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(yaml.safe_dump(doc))
    os.replace(tmp, path)
    return path
