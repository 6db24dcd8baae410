"""The gpumesh.io/v1alpha1 API: models shared by the operator, the agent and the CLI."""

from gpumesh.api.base import API_VERSION, GROUP, VERSION, Condition
from gpumesh.api.gpucluster import GPUCluster, GPUClusterSpec, GPUClusterStatus, WorkerGroup
from gpumesh.api.gpunode import GPUNode, GPUNodeSpec, GPUNodeStatus
from gpumesh.api.gpuquota import GPUQuota
from gpumesh.api.job import Job, JobSpec, JobStatus
from gpumesh.api.kinds import KINDS, KindInfo, kind_info
from gpumesh.api.manifests import FieldError, ManifestError, parse_manifest

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "Condition",
    "FieldError",
    "GPUCluster",
    "GPUClusterSpec",
    "GPUClusterStatus",
    "GPUNode",
    "GPUNodeSpec",
    "GPUNodeStatus",
    "GPUQuota",
    "Job",
    "JobSpec",
    "JobStatus",
    "KindInfo",
    "ManifestError",
    "WorkerGroup",
    "kind_info",
    "parse_manifest",
]
