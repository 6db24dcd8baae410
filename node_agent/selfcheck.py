"""A proof-of-GPU challenge made, answered and checked on this host, as the operator
would: ``gpumesh agent probe --proof`` and ``make test-gpu`` use it to show a supplier that
its GPUs can pass, and how long they take."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from gpumesh.api.gpunode import Challenge, ChallengeGpu
from gpumesh.api.proof import Shape, draw_samples, opening_problem
from gpumesh.node_agent.nvml.types import DeviceIdentity
from gpumesh.node_agent.prove import Prover

SIDE: Final = 8192
INNER: Final = 65536
FAKE_SHAPE: Final = Shape(64, 4096, 64)
SAMPLES: Final = 16


def self_check(
    prover: Prover, node: str, identities: Sequence[DeviceIdentity], shape: Shape | None = None
) -> dict[str, Any]:
    """Roots, openings and their check for every GPU: the first problem found, and times."""
    shape = shape or (FAKE_SHAPE if prover.name == "numpy" else Shape(SIDE, INNER, SIDE))
    challenge = Challenge(
        id=secrets.token_hex(8),
        seed=secrets.token_hex(32),
        issued_time=datetime.now(UTC),
        deadline_seconds=3600,
        gpus=[
            ChallengeGpu(uuid=i.uuid, rows=shape.rows, inner=shape.inner, cols=shape.cols)
            for i in identities
        ],
    )
    devices = {i.uuid: i.index for i in identities}
    started = time.perf_counter()
    roots = prover.commit(challenge, node, devices)
    committed = time.perf_counter()
    openings = prover.open(draw_samples(challenge, SAMPLES, secrets.randbelow))
    opened = time.perf_counter()
    prover.close()
    problems = (opening_problem(challenge, node, roots[o.gpu], o) for o in openings)
    problem = next((p for p in problems if p is not None), None)
    checked = time.perf_counter()
    return {
        "engine": prover.name,
        "gpus": len(identities),
        "shape": [shape.rows, shape.inner, shape.cols],
        "tflopsPerGpu": round(shape.flops * len(identities) / (committed - started) / 1e12, 3),
        "commitSeconds": round(committed - started, 3),
        "openSeconds": round(opened - committed, 3),
        "checkSeconds": round(checked - opened, 3),
        "checked": len(openings),
        "problem": problem,
    }
