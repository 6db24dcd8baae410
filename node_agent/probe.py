"""One look at this host's GPUs, as the agent would see them: ``gpumesh agent probe``.

A supplier runs it before joining a node (does NVML answer, are the GPUs healthy, does the
proof of GPU pass?) and we run it on lent GPU machines to record what real NVML says. It
uses the agent's own collector and verifier, so what it prints is what the agent reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.clock import Clock
from gpumesh.node_agent.cheats import tamper_for
from gpumesh.node_agent.collector import Collector
from gpumesh.node_agent.health import HealthPolicy
from gpumesh.node_agent.nvml.types import NvmlBackend
from gpumesh.node_agent.prove import select_prover
from gpumesh.node_agent.selfcheck import self_check
from gpumesh.node_agent.snapshot import GpuSnapshot


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
    proof: bool = False,
    policy: HealthPolicy | None = None,
) -> tuple[dict[str, Any], bool]:
    """One sweep, and a proof-of-GPU challenge answered and checked here with ``proof``.

    Returns the report (JSON-ready) and whether the node is fit to join: NVML answers,
    every GPU may take work (Healthy, or Degraded, which placement ranks lower), and the
    proof, when asked for, Passed.
    """
    try:
        return _probe(backend, node, clock, proof, policy)
    finally:
        backend.shutdown()


def _probe(
    backend: NvmlBackend,
    node: str,
    clock: Clock,
    proof: bool,
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
    if proof:
        fake = bool(getattr(backend, "is_fake", False))
        prover = select_prover(fake, tamper_for(getattr(backend, "cheat", None)))
        if prover is None:
            report["proof"] = {"problem": "no CuPy: pip install 'gpumesh[gpu]'"}
            fit = False
        else:
            check = self_check(prover, node, snapshot.identities)
            report["proof"] = check
            fit = fit and check["problem"] is None
    report["fit"] = fit
    return report, fit
