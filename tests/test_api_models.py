"""The API models accept what a renter means and reject mistakes with the field and reason."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from typer.testing import CliRunner

from corpus import InvalidCase, load_examples, load_invalid_cases
from gpumesh.api.base import IMAGE_MESSAGE
from gpumesh.api.gpucluster import GPUCluster, GPUClusterSpec
from gpumesh.api.job import Job
from gpumesh.api.manifests import ManifestError, parse_manifest
from gpumesh.cli import app

INVALID = load_invalid_cases()


def test_the_corpus_is_large_enough_to_mean_something() -> None:
    assert len(INVALID) >= 30
    assert len(load_examples()) >= 5


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_invalid_manifest_is_rejected_naming_field_and_reason(case: InvalidCase) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(case.doc)
    matching = [e for e in raised.value.errors if e.field == case.field]
    assert matching, f"no error names {case.field}: {raised.value}"
    assert any(case.expect in e.reason for e in matching), str(raised.value)


@pytest.mark.parametrize(("path", "doc"), load_examples(), ids=lambda v: getattr(v, "name", ""))
def test_every_example_validates(path: Any, doc: dict[str, Any]) -> None:
    parse_manifest(doc)


def test_defaults_fill_a_minimal_cluster() -> None:
    spec = GPUClusterSpec.model_validate({"workers": {}})
    assert spec.workers.replicas == 1
    assert spec.workers.gpus_per_worker == 1
    assert spec.placement.strategy == "Pack"
    assert spec.failover.mode == "Migrate"
    assert spec.container_image() == f"rayproject/ray:{spec.ray_version}-gpu"


def test_prices_are_exact_decimals_and_round_trip_as_strings() -> None:
    spec = GPUClusterSpec.model_validate(
        {"workers": {}, "placement": {"maxPricePerGpuHour": "2.10"}}
    )
    assert spec.placement.max_price_per_gpu_hour == Decimal("2.10")
    assert spec.to_api()["placement"]["maxPricePerGpuHour"] == "2.10"


def test_wire_form_is_camel_case_without_unset_fields() -> None:
    spec = GPUClusterSpec.model_validate({"workers": {"gpusPerWorker": 2, "replicas": 3}})
    wire = spec.to_api()
    assert wire["workers"]["gpusPerWorker"] == 2
    assert "image" not in wire
    assert GPUClusterSpec.model_validate(wire) == spec


def test_worker_groups_lists_the_main_group_first() -> None:
    spec = GPUClusterSpec.model_validate(
        {"workers": {"replicas": 2}, "additionalWorkerGroups": [{"name": "cheap"}]}
    )
    assert [name for name, _ in spec.worker_groups()] == ["workers", "cheap"]
    assert spec.workers.gpus == 2


def test_every_replica_problem_is_reported_at_once() -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(
            {
                "apiVersion": "gpumesh.io/v1alpha1",
                "kind": "GPUCluster",
                "metadata": {"name": "x"},
                "spec": {"workers": {"replicas": 3, "minReplicas": 4, "maxReplicas": 2}},
            }
        )
    message = str(raised.value)
    assert "must not be below minReplicas" in message
    assert "must not exceed maxReplicas" in message


def test_unknown_kind_and_api_version_are_named() -> None:
    with pytest.raises(ManifestError, match="gpumesh serves GPUCluster, Job, GPUNode, GPUQuota"):
        parse_manifest({"apiVersion": "gpumesh.io/v1alpha1", "kind": "Cluster"})
    with pytest.raises(ManifestError, match=r"apiVersion: must be gpumesh.io/v1alpha1"):
        parse_manifest({"apiVersion": "gpumesh.io/v1", "kind": "GPUCluster"})


def test_job_accepts_a_reference_or_a_template() -> None:
    by_ref = Job.model_validate(
        {"spec": {"entrypoint": "python x.py", "clusterRef": {"name": "shared"}}}
    )
    assert by_ref.spec.cluster_template is None
    inline = Job.model_validate(
        {"spec": {"entrypoint": "python x.py", "clusterTemplate": {"workers": {}}}}
    )
    assert inline.spec.cluster_ref is None


def test_status_ignores_fields_from_newer_versions() -> None:
    cluster = GPUCluster.model_validate(
        {"spec": {"workers": {}}, "status": {"phase": "Ready", "futureField": 1}}
    )
    assert cluster.status is not None
    assert cluster.status.phase == "Ready"


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_gpumesh_validate_prints_the_field_and_the_whole_reason(case: InvalidCase) -> None:
    result = CliRunner().invoke(app, ["validate", str(case.path)])
    assert result.exit_code == 1
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert f"{case.field}: " in printed
    assert case.expect in printed
    if case.field == "spec.image":
        assert IMAGE_MESSAGE in printed  # brackets in the message are text, not markup
