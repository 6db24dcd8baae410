"""One look at this host's GPUs, as the agent would see them: ``gpumesh agent probe``.

A supplier runs it before joining a node (does NVML answer, are the GPUs healthy, does the
proof of GPU pass?) and we run it on lent GPU machines to record what real NVML says. It
uses the agent's own collector and verifier, so what it prints is what the agent reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.node_agent.clock import Clock
from gpumesh.node_agent.collector import Collector
from gpumesh.node_agent.health import HealthPolicy
from gpumesh.node_agent.nvml.types import NvmlBackend
from gpumesh.node_agent.snapshot import GpuSnapshot
from gpumesh.node_agent.verify import Claim, select_engine, verify


def _gpu(g: GpuSnapshot) -> dict[str, Any]:
    return {
        "index": g.index,
        "identity": dataclasses.asdict(g.identity) if g.identity else None,
        "health": g.health,
        "reasons": list(g.reasons),
        "sample": dataclasses.asdict(g.sample) if g.sample else None,
    }


def probe(
    backend: NvmlBackend,
    node: str,
    clock: Clock,
    *,
    nonce: str | None = None,
    policy: HealthPolicy | None = None,
) -> tuple[dict[str, Any], bool]:
    """One sweep, and the proof of GPU when ``nonce`` is given.

    Returns the report (JSON-ready) and whether the node is fit to join: NVML answers,
    every GPU may take work (Healthy, or Degraded, which placement ranks lower), and the
    proof, when asked for, Passed.
    """
    try:
        return _probe(backend, node, clock, nonce, policy)
    finally:
        backend.shutdown()


def _probe(
    backend: NvmlBackend,
    node: str,
    clock: Clock,
    nonce: str | None,
    policy: HealthPolicy | None,
) -> tuple[dict[str, Any], bool]:
    snapshot = Collector(backend, node, clock, policy).sweep()
    report: dict[str, Any] = {
        "node": node,
        "nvml": {
            "ok": snapshot.nvml_ok,
            "error": snapshot.nvml_error,
            "driver": snapshot.driver_version,
            "cuda": snapshot.cuda_version,
        },
        "health": snapshot.health,
        "sweepSeconds": round(snapshot.sweep_seconds, 6),
        "gpus": [_gpu(g) for g in snapshot.gpus],
    }
    fit = snapshot.nvml_ok and bool(snapshot.gpus) and snapshot.health in ACCEPTING_HEALTH
    if nonce is not None:
        engine = select_engine(backend)
        result = verify(
            snapshot.identities, Claim(count=len(snapshot.gpus)), nonce, engine, clock.now
        )
        report["verification"] = {
            "engine": engine.name if engine else None,
            **result.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        fit = fit and result.result == "Passed"
    report["fit"] = fit
    return report, fit
