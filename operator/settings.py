"""Operator settings, read once from the environment (one settings object)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorSettings:
    """What an operator deployment may tune; defaults suit a small mesh."""

    namespace: str = "gpumesh-system"
    resync_seconds: float = 30.0
    heartbeat_seconds: float = 15.0
    liveness_stale_seconds: float = 90.0
    max_workers: int = 16
    watch_server_timeout: int = 300

    @classmethod
    def from_env(cls) -> OperatorSettings:
        env = os.environ
        return cls(
            namespace=env.get("GPUMESH_NAMESPACE", cls.namespace),
            resync_seconds=float(env.get("GPUMESH_RESYNC_SECONDS", cls.resync_seconds)),
            heartbeat_seconds=float(env.get("GPUMESH_HEARTBEAT_SECONDS", cls.heartbeat_seconds)),
            liveness_stale_seconds=float(
                env.get("GPUMESH_LIVENESS_STALE_SECONDS", cls.liveness_stale_seconds)
            ),
            max_workers=int(env.get("GPUMESH_MAX_WORKERS", cls.max_workers)),
            watch_server_timeout=int(
                env.get("GPUMESH_WATCH_SERVER_TIMEOUT", cls.watch_server_timeout)
            ),
        )


SETTINGS = OperatorSettings.from_env()
