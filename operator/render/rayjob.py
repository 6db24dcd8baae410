"""Job + attempt + placement -> KubeRay RayJob manifest (pure).

With a cluster template the RayJob carries its own ``rayClusterSpec``, made by the same
builder as a GPUCluster's RayCluster, and is suspendable (``shutdownAfterJobFinishes`` is
what KubeRay requires for that). While the job waits, the spec has no workers; admission
writes the placed groups and ``suspend: false`` in one apply, and KubeRay builds the
cluster from the spec current at resumption (edits after that are ignored by KubeRay).
With a cluster reference the RayJob selects the GPUCluster's RayCluster instead.

Every attempt's program finds ``GPUMESH_ATTEMPT`` and, when set, ``GPUMESH_CHECKPOINT_URI``
in its Ray runtime environment, so training can resume from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import yaml

from gpumesh.api.job import JobSpec
from gpumesh.operator.jobs.naming import ATTEMPT, JOB
from gpumesh.operator.render import labels as names
from gpumesh.operator.render.raycluster import (
    Manifest,
    Owner,
    RenderSettings,
    WorkerSlot,
    raycluster_spec,
)

RAY_CLUSTER_SELECTOR: Final = "ray.io/cluster"
ENV_ATTEMPT: Final = "GPUMESH_ATTEMPT"
ENV_CHECKPOINT: Final = "GPUMESH_CHECKPOINT_URI"

DEFAULT_RENDER: Final = RenderSettings()

SubmissionMode = Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]


def rayjob(
    spec: JobSpec,
    *,
    name: str,
    namespace: str,
    owner: Owner,
    attempt: int,
    suspend: bool = True,
    slots: Sequence[WorkerSlot] = (),
    head_node: str | None = None,
    ray_cluster: str | None = None,
    submission_mode: SubmissionMode = "K8sJobMode",
    settings: RenderSettings = DEFAULT_RENDER,
) -> Manifest:
    """The RayJob of attempt ``attempt`` of the Job ``owner``, ready for server-side apply.

    ``ray_cluster`` (the referenced GPUCluster's RayCluster) is required for a Job with
    ``clusterRef``; ``suspend``, ``slots`` and ``head_node`` apply to one with a template.
    """
    job_labels = {JOB: owner.name, ATTEMPT: str(attempt), names.MANAGED_BY: names.MANAGER}
    body: Manifest = {
        "entrypoint": spec.entrypoint,
        "runtimeEnvYAML": runtime_env_yaml(spec, attempt),
        "submissionMode": submission_mode,
        "metadata": {JOB: owner.name, ATTEMPT: str(attempt)},
    }
    template = spec.cluster_template
    if template is not None:
        cluster = raycluster_spec(
            template.model_copy(update={"suspend": False}),
            slots,
            cluster_name=name,
            head_node=head_node,
            settings=settings,
        )
        _label_pods(cluster, owner.name)
        body.update(
            {"suspend": suspend, "shutdownAfterJobFinishes": True, "rayClusterSpec": cluster}
        )
    else:
        if ray_cluster is None:
            raise ValueError("a Job with clusterRef needs the referenced RayCluster's name")
        # No suspend here: KubeRay refuses it with clusterSelector; the cluster is shared.
        body["clusterSelector"] = {RAY_CLUSTER_SELECTOR: ray_cluster}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": body,
    }


def runtime_env_yaml(spec: JobSpec, attempt: int) -> str:
    """The Job's Ray runtime environment with the attempt and checkpoint variables added."""
    env: dict[str, Any] = dict(spec.runtime_env or {})
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars[ENV_ATTEMPT] = str(attempt)
    if spec.checkpoint_uri:
        env_vars[ENV_CHECKPOINT] = spec.checkpoint_uri
    env["env_vars"] = env_vars
    return yaml.safe_dump(env, sort_keys=True)


def _label_pods(cluster: Manifest, job: str) -> None:
    """Mark every pod with its Job, so pods of a Job and a GPUCluster never mix."""
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        group["template"]["metadata"]["labels"][JOB] = job
