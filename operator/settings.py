"""Operator settings, read once from the environment (one settings object)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorSettings:
    """What an operator deployment may tune; defaults suit a small mesh."""

    namespace: str = "gpumesh-system"
    resync_seconds: float = 30.0
    leader_lease_seconds: int = 8
    """How long the leader's Lease holds unrenewed: a standby takes over this long after
    the leader's last renewal (it renews every ``leader_retry_seconds``)."""
    leader_renew_deadline_seconds: float = 6.0
    """A leader that has not renewed for this long stops (the process exits)."""
    leader_retry_seconds: float = 1.0
    liveness_stale_seconds: float = 90.0
    max_workers: int = 16
    status_interval_seconds: float = 1.0
    """Least time between two status writes of one GPUCluster within one phase."""
    status_progress_per_second: float = 5.0
    """GPUCluster status writes that only report progress (phase Provisioning), across
    all clusters; the rest wait their turn (0: no limit)."""
    status_progress_burst: int = 10
    watch_server_timeout: int = 300
    mesh: bool = True
    """Plan the WireGuard mesh (GPUNode status.mesh and the catalogue ConfigMap)."""
    mesh_overlay_cidr: str = "10.90.0.0/16"
    mesh_pod_cidr: str = "10.128.0.0/11"
    mesh_pod_prefix: int = 24
    mesh_cooldown_seconds: float = 3600.0
    mesh_catalogue: str = "gpumesh-mesh"
    mesh_full_resync_seconds: float = 300.0
    """How often the mesh planner lists GPUNodes and Leases again: one list costs the API
    server about what ten minutes of heartbeat events do at this period, and a missed
    event is rare."""
    reputation_half_life_seconds: float = 7 * 86400.0
    """How fast what the operator saw of a node fades from its reputation."""
    reputation_prior_seconds: float = 3600.0
    """A new node's benefit of the doubt (it starts at 0.5)."""
    reputation_rewrite_seconds: float = 600.0
    """Write a node's record at least this often while it changes."""
    proof_side: int = 32768
    """Rows and columns of each GPU's product in a proof of GPU (a power of two)."""
    proof_vram_fill: float = 0.75
    proof_scale: float = 1.0
    """Shrinks every proof's product (the dev fleet's CPU engine: 1e-4)."""
    proof_samples: int = 16
    proof_allowance_seconds: float = 10.0
    proof_slack: float = 2.0
    proof_open_seconds: float = 30.0
    proof_retry_seconds: float = 600.0
    proof_recheck_mean_seconds: float = 86400.0
    mesh_node_selector: str = ""
    """Only GPUNodes with these labels join the mesh, as "k=v,k2=v2" (empty: all)."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        env = os.environ
        return cls(
            namespace=env.get("GPUMESH_NAMESPACE", cls.namespace),
            resync_seconds=float(env.get("GPUMESH_RESYNC_SECONDS", cls.resync_seconds)),
            leader_lease_seconds=int(
                env.get("GPUMESH_LEADER_LEASE_SECONDS", cls.leader_lease_seconds)
            ),
            leader_renew_deadline_seconds=float(
                env.get("GPUMESH_LEADER_RENEW_DEADLINE_SECONDS", cls.leader_renew_deadline_seconds)
            ),
            leader_retry_seconds=float(
                env.get("GPUMESH_LEADER_RETRY_SECONDS", cls.leader_retry_seconds)
            ),
            liveness_stale_seconds=float(
                env.get("GPUMESH_LIVENESS_STALE_SECONDS", cls.liveness_stale_seconds)
            ),
            max_workers=int(env.get("GPUMESH_MAX_WORKERS", cls.max_workers)),
            status_interval_seconds=float(
                env.get("GPUMESH_STATUS_INTERVAL_SECONDS", cls.status_interval_seconds)
            ),
            status_progress_per_second=float(
                env.get("GPUMESH_STATUS_PROGRESS_PER_SECOND", cls.status_progress_per_second)
            ),
            status_progress_burst=int(
                env.get("GPUMESH_STATUS_PROGRESS_BURST", cls.status_progress_burst)
            ),
            watch_server_timeout=int(
                env.get("GPUMESH_WATCH_SERVER_TIMEOUT", cls.watch_server_timeout)
            ),
            mesh=env.get("GPUMESH_MESH", "true").lower() not in ("0", "false", "no", "off"),
            mesh_overlay_cidr=env.get("GPUMESH_MESH_OVERLAY_CIDR", cls.mesh_overlay_cidr),
            mesh_pod_cidr=env.get("GPUMESH_MESH_POD_CIDR", cls.mesh_pod_cidr),
            mesh_pod_prefix=int(env.get("GPUMESH_MESH_POD_PREFIX", cls.mesh_pod_prefix)),
            mesh_cooldown_seconds=float(
                env.get("GPUMESH_MESH_COOLDOWN_SECONDS", cls.mesh_cooldown_seconds)
            ),
            mesh_catalogue=env.get("GPUMESH_MESH_CATALOGUE", cls.mesh_catalogue),
            mesh_full_resync_seconds=float(
                env.get("GPUMESH_MESH_FULL_RESYNC_SECONDS", cls.mesh_full_resync_seconds)
            ),
            mesh_node_selector=env.get("GPUMESH_MESH_NODE_SELECTOR", cls.mesh_node_selector),
            proof_side=int(env.get("GPUMESH_PROOF_SIDE", cls.proof_side)),
            proof_vram_fill=float(env.get("GPUMESH_PROOF_VRAM_FILL", cls.proof_vram_fill)),
            proof_scale=float(env.get("GPUMESH_PROOF_SCALE", cls.proof_scale)),
            proof_samples=int(env.get("GPUMESH_PROOF_SAMPLES", cls.proof_samples)),
            proof_allowance_seconds=float(
                env.get("GPUMESH_PROOF_ALLOWANCE_SECONDS", cls.proof_allowance_seconds)
            ),
            proof_slack=float(env.get("GPUMESH_PROOF_SLACK", cls.proof_slack)),
            proof_open_seconds=float(env.get("GPUMESH_PROOF_OPEN_SECONDS", cls.proof_open_seconds)),
            proof_retry_seconds=float(
                env.get("GPUMESH_PROOF_RETRY_SECONDS", cls.proof_retry_seconds)
            ),
            proof_recheck_mean_seconds=float(
                env.get("GPUMESH_PROOF_RECHECK_MEAN_SECONDS", cls.proof_recheck_mean_seconds)
            ),
            reputation_half_life_seconds=float(
                env.get("GPUMESH_REPUTATION_HALF_LIFE_SECONDS", cls.reputation_half_life_seconds)
            ),
            reputation_prior_seconds=float(
                env.get("GPUMESH_REPUTATION_PRIOR_SECONDS", cls.reputation_prior_seconds)
            ),
            reputation_rewrite_seconds=float(
                env.get("GPUMESH_REPUTATION_REWRITE_SECONDS", cls.reputation_rewrite_seconds)
            ),
        )


SETTINGS = OperatorSettings.from_env()
