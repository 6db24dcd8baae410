"""kopf runtime settings that matter at scale: which objects get a diff base."""

from __future__ import annotations

from typing import Any, cast

import kopf

from gpumesh.operator.handlers.lifecycle import JobsOnlyDiffBase, watch_pods_of_others

STORAGE = JobsOnlyDiffBase(prefix="gpumesh.io", key="last-handled-configuration")


def body(raw: dict[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, raw))


def test_a_job_keeps_kopfs_diff_base_of_its_spec() -> None:
    job = {
        "apiVersion": "gpumesh.io/v1alpha1",
        "kind": "Job",
        "metadata": {"name": "train", "labels": {"team": "a"}},
        "spec": {"entrypoint": "python train.py"},
        "status": {"phase": "Queued"},
    }
    essence = STORAGE.build(body=body(job))
    assert essence["spec"] == {"entrypoint": "python train.py"}
    assert "status" not in essence


def test_other_objects_get_an_empty_essence_and_nothing_is_copied() -> None:
    raycluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "c"},
        "spec": {"workerGroupSpecs": [{"replicas": 1}]},
        "status": {"readyWorkerReplicas": 1},
    }
    assert STORAGE.build(body=body(raycluster)) == {}
    batch_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {}}
    assert STORAGE.build(body=body(batch_job)) == {}


def test_only_others_unfinished_pods_are_streamed_and_no_other_kind_is_filtered() -> None:
    settings = kopf.OperatorSettings()
    watch_pods_of_others(settings)
    pods = kopf.Resource("", "v1", "pods", namespaced=True)
    nodes = kopf.Resource("", "v1", "nodes", namespaced=False)
    rayclusters = kopf.Resource("ray.io", "v1", "rayclusters", namespaced=True)
    assert settings.watching.label_selectors.collect(pods) == ["!gpumesh.io/cluster"]
    assert settings.watching.field_selectors.collect(pods) == [
        "status.phase!=Succeeded,status.phase!=Failed"
    ]
    for other in (nodes, rayclusters):
        assert settings.watching.label_selectors.collect(other) == []
        assert settings.watching.field_selectors.collect(other) == []
