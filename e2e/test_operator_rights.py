"""The operator's chart grants what the operator uses, and nothing it does not.

The local control plane's API server records every request of gpumesh's ServiceAccounts
(an audit log); every e2e test runs the operator on its chart's ServiceAccount token. This
test runs after all the others (see conftest) and holds what the operator asked for during
the whole run against the ClusterRole and Role the operator chart renders.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from testbed import install, toolchain
from testbed.testing import KubeTarget

pytestmark = [pytest.mark.e2e, pytest.mark.after_all]

OPERATOR = f"system:serviceaccount:{install.NAMESPACE}:{install.OPERATOR_ACCOUNT}"


class Right(NamedTuple):
    verb: str
    group: str
    resource: str
    """With its subresource: ``gpuclusters/status``."""
    namespaced: bool
    """Granted (or asked for) only inside the operator's namespace."""


IMPLIED: dict[tuple[str, str, str], str] = {
    ("create", "ray.io", "rayclusters"): "server-side apply that creates is checked as create",
    ("create", "ray.io", "rayjobs"): "server-side apply that creates is checked as create",
    ("create", "", "configmaps"): "server-side apply of the first mesh catalogue",
    ("create", "coordination.k8s.io", "leases"): "its heartbeat Lease, the first time",
    ("delete", "ray.io", "rayjobs"): "stopping an attempt; no e2e test stops one",
}
"""Rights the operator needs though the audit log shows another verb (or the run had no
occasion to use them), each with why."""


def granted(namespace: str) -> set[Right]:
    """What the operator chart's ClusterRole and Role grant its ServiceAccount."""
    rendered = install.helm(
        Path("/dev/null"),
        "template",
        install.OPERATOR_RELEASE,
        str(install.CHARTS / "gpumesh-operator"),
        "-n",
        namespace,
    )
    rights: set[Right] = set()
    for doc in yaml.safe_load_all(rendered):
        if not doc or doc.get("kind") not in ("ClusterRole", "Role"):
            continue
        namespaced = doc["kind"] == "Role"
        for rule in doc.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        rights.add(Right(verb, group, resource, namespaced))
    return rights


def used(audit_log: Path, namespace: str) -> Iterator[tuple[Right, int]]:
    """What the operator asked the API server for, and the answer's HTTP status."""
    for line in audit_log.read_text().splitlines():
        event: dict[str, Any] = json.loads(line)
        if event["user"]["username"] != OPERATOR:
            continue
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery and /version: no RBAC rule names them
        if ref.get("resource") == "selfsubjectaccessreviews":
            continue  # the identity suite's can-i questions, asked with the operator's token
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        yield (
            Right(
                event["verb"],
                ref.get("apiGroup") or "",
                resource,
                ref.get("namespace") == namespace,
            ),
            int((event.get("responseStatus") or {}).get("code") or 0),
        )


def covers(rights: set[Right], asked: Right) -> bool:
    plain = Right(asked.verb, asked.group, asked.resource, False)
    if plain in rights:
        return True
    return asked.namespaced and plain._replace(namespaced=True) in rights


def test_the_operator_chart_grants_exactly_what_the_operator_used(kube: KubeTarget) -> None:
    if kube.state_dir is None:
        pytest.skip("external cluster: its API server keeps no audit log for gpumesh")
    toolchain.ensure(["helm"], assets=False)
    audit_log = kube.state_dir / "logs" / "audit.log"
    rights = granted(install.NAMESPACE)
    seen = dict(used(audit_log, install.NAMESPACE))
    assert seen, "the operator made no request on its own token during the run"
    refused = sorted(r for r, code in seen.items() if code == 403)
    assert not refused, f"the API server refused the operator: {refused}"
    missing = sorted(r for r in seen if not covers(rights, r))
    assert not missing, f"used but not granted by the chart: {missing}"
    exercised = {(r.verb, r.group, r.resource, False) for r in seen} | {
        (r.verb, r.group, r.resource, True) for r in seen if r.namespaced
    }
    unused = sorted(
        r
        for r in rights
        if tuple(r) not in exercised
        and (r.verb, r.group, r.resource) not in IMPLIED
        and not (r.namespaced is False and (r.verb, r.group, r.resource, True) in exercised)
    )
    assert not unused, f"granted by the chart but never used by the operator: {unused}"
