"""The generated CRDs are structural, complete, and the checked-in copies are current."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from corpus import ROOT
from gpumesh import crdgen
from gpumesh.api.kinds import KINDS, KindInfo

COMBINATORS = ("anyOf", "oneOf", "allOf", "not")


def structural_problems(node: Any, path: str = "") -> list[str]:
    """What makes a schema non-structural for kube-apiserver, as a list of findings."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return [f"{path}: not a mapping"]
    if "$ref" in node:
        problems.append(f"{path}: $ref")
    if "nullable" in node:
        problems.append(f"{path}: nullable (optional fields are omitted instead)")
    for key in COMBINATORS:
        if key in node and any("type" in b for b in node[key]):
            problems.append(f"{path}: {key} with types")
    typed = (
        "type" in node
        or node.get("x-kubernetes-preserve-unknown-fields")
        or node.get("x-kubernetes-int-or-string")
    )
    if not typed:
        problems.append(f"{path}: no type")
    if node.get("uniqueItems"):
        problems.append(f"{path}: uniqueItems is forbidden in CRDs")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def undescribed(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, sub in node.get("properties", {}).items():
        if not sub.get("description"):
            missing.append(f"{path}.{name}")
        missing += undescribed(sub, f"{path}.{name}")
    if "items" in node:
        missing += undescribed(node["items"], f"{path}[]")
    return missing


def schema_of(info: KindInfo) -> dict[str, Any]:
    schema: dict[str, Any] = crdgen.crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("info", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(info: KindInfo) -> None:
    assert structural_problems(schema_of(info)) == []


@pytest.mark.parametrize("info", KINDS, ids=lambda k: k.kind)
def test_every_field_has_a_description_for_kubectl_explain(info: KindInfo) -> None:
    schema = schema_of(info)
    assert undescribed(schema["properties"]["spec"], "spec") == []
    assert undescribed(schema["properties"]["status"], "status") == []


@pytest.mark.parametrize("info", KINDS, ids=lambda k: k.kind)
def test_checked_in_crd_is_up_to_date(info: KindInfo) -> None:
    path = ROOT / "crds" / crdgen.crd_file_name(info)
    assert path.read_text() == crdgen.render(info), (
        f"{path} is stale: run `gpumesh crds --out crds`"
    )


def test_the_structural_check_catches_what_it_should() -> None:
    bad = {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}, "b": {}}}
    assert len(structural_problems(bad)) == 3  # a: anyOf with types, a: no type, b: no type


def test_gpucluster_scales_through_the_main_worker_group() -> None:
    version = crdgen.crd(KINDS[0])["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.workers.replicas"
    assert version["subresources"]["status"] == {}


def test_names_categories_and_columns() -> None:
    names = {c["spec"]["names"]["kind"]: c["spec"]["names"] for c in crdgen.all_crds()}
    assert set(names) == {"GPUCluster", "Job", "GPUNode", "GPUQuota"}
    assert all("gpumesh" in n["categories"] for n in names.values())
    assert "gjob" in names["Job"]["shortNames"]
    node_crd = next(c for c in crdgen.all_crds() if c["spec"]["names"]["kind"] == "GPUNode")
    assert node_crd["spec"]["scope"] == "Cluster"
    columns = [c["name"] for c in node_crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert {"Supplier", "Region", "Health", "Verified"} <= set(columns)


def test_cross_field_rules_are_cel_with_messages() -> None:
    text = crdgen.render_all()
    assert "has(self.clusterRef) != has(self.clusterTemplate)" in text
    assert "replicas must not exceed maxReplicas" in text


def test_lists_declare_their_merge_type() -> None:
    def arrays(node: Any) -> list[dict[str, Any]]:
        found = []
        if isinstance(node, dict):
            if node.get("type") == "array":
                found.append(node)
            for value in node.values():
                found += arrays(value)
        elif isinstance(node, list):
            for value in node:
                found += arrays(value)
        return found

    for info in KINDS:
        found = arrays(schema_of(info))
        assert found
        for array in found:
            assert "x-kubernetes-list-type" in array


def test_render_all_is_one_yaml_stream_of_every_crd() -> None:
    docs = list(yaml.safe_load_all(crdgen.render_all()))
    assert [d["metadata"]["name"] for d in docs] == [
        "gpuclusters.gpumesh.io",
        "jobs.gpumesh.io",
        "gpunodes.gpumesh.io",
        "gpuquotas.gpumesh.io",
    ]


@pytest.mark.parametrize("info", KINDS, ids=lambda k: k.kind)
def test_operator_chart_ships_the_same_crds(info: KindInfo) -> None:
    chart_copy = ROOT / "charts" / "gpumesh-operator" / "crds" / crdgen.crd_file_name(info)
    assert chart_copy.read_text() == crdgen.render(info), f"{chart_copy} is stale: run `make crds`"


@pytest.mark.parametrize("kind", ["GPUCluster", "Job"])
def test_a_renters_object_nobody_wrote_shows_a_generation_not_yet_observed(kind: str) -> None:
    """kstatus reads an object without status as done; generation >= 1 is never 0."""
    status = schema_of(next(k for k in KINDS if k.kind == kind))["properties"]["status"]
    assert status["default"] == {"observedGeneration": 0}
    assert status["properties"]["observedGeneration"]["type"] == "integer"
