"""Our CRDs on the real kube-apiserver: installed server-side, mistakes rejected with the
field and reason, examples accepted. The API server is the final judge of the schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from corpus import InvalidCase, load_examples, load_invalid_cases
from gpumesh.api.kinds import kind_info
from testbed import mesh
from testbed.testing import KubeTarget

pytestmark = pytest.mark.e2e

NS = "e2e-crds"


@pytest.fixture(scope="module")
def api(kube: KubeTarget) -> client.ApiClient:
    mesh.apply_crds(kube.api)
    mesh.ensure_namespace(kube.api, NS)
    return kube.api


def dry_run_create(api: client.ApiClient, doc: dict[str, Any]) -> None:
    """Create with dryRun=All and strict field validation, as `kubectl apply` validates."""
    info = kind_info(doc["kind"])
    custom = client.CustomObjectsApi(api)
    group, version = doc["apiVersion"].split("/")
    if info.scope == "Cluster":
        custom.create_cluster_custom_object(
            group, version, info.plural, doc, dry_run="All", field_validation="Strict"
        )
    else:
        custom.create_namespaced_custom_object(
            group, version, NS, info.plural, doc, dry_run="All", field_validation="Strict"
        )


def test_crds_are_served_with_status_and_scale(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    crd: Any = ext.read_custom_resource_definition("gpuclusters.gpumesh.io")
    assert crd.spec.versions[0].subresources.scale.spec_replicas_path == ".spec.workers.replicas"
    listed: Any = ext.list_custom_resource_definition()
    names = {c.metadata.name for c in listed.items}
    assert {
        "gpuclusters.gpumesh.io",
        "jobs.gpumesh.io",
        "gpunodes.gpumesh.io",
        "gpuquotas.gpumesh.io",
    } <= names


@pytest.mark.parametrize("case", load_invalid_cases(), ids=lambda c: c.name)
def test_invalid_manifest_is_rejected_by_the_api_server(
    api: client.ApiClient, case: InvalidCase
) -> None:
    with pytest.raises(ApiException) as raised:
        dry_run_create(api, case.doc)
    message = raised.value.body or ""
    assert raised.value.status in (400, 422), message
    assert case.field in message, message
    assert case.expect_apiserver in message, message


@pytest.mark.parametrize(("path", "doc"), load_examples(), ids=lambda v: getattr(v, "name", ""))
def test_every_example_is_accepted(api: client.ApiClient, path: Path, doc: dict[str, Any]) -> None:
    dry_run_create(api, {**doc, "metadata": {**doc["metadata"], "namespace": NS}})
