"""Proof of GPU: what it costs the operator to check an answer and the agent to give one.

The agent's side runs on the fake engine (NumPy, the dev fleet's size); on a GPU machine
``make test-gpu`` measures the real products (docs/BENCHMARKS.md, section gpu_proof).
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime

import numpy as np

from bench.harness import Report, Row, sample
from gpumesh.api.gpunode import Challenge, ChallengeGpu, GPUInfo
from gpumesh.api.proof import (
    Keys,
    Shape,
    draw_samples,
    entry,
    opening_problem,
    root_of_opening,
    sha256_64,
)
from gpumesh.node_agent.prove import ArrayProver
from gpumesh.operator.proof import ProofSettings, shape_for
from gpumesh.operator.settings import OperatorSettings

COMMAND = "make bench BENCH=proof"
H100 = GPUInfo(index=0, uuid="GPU-1", model="NVIDIA H100 80GB HBM3", memory_mib=81559)
CHECK_TARGET_S = 5.0
"""Operator CPU per full-size 8-GPU node: at one check a day, 1000 nodes cost ~1 CPU-hour."""


def _dev_challenge(gpus: int) -> tuple[Challenge, Shape]:
    settings = OperatorSettings(proof_side=64, proof_scale=1e-4)
    shape = shape_for(H100, ProofSettings.of(settings))
    challenge = Challenge(
        id="0" * 16,
        seed="ab" * 32,
        issued_time=datetime.now(UTC),
        deadline_seconds=60,
        gpus=[
            ChallengeGpu(uuid=f"GPU-{i}", rows=shape.rows, inner=shape.inner, cols=shape.cols)
            for i in range(gpus)
        ],
    )
    return challenge, shape


def run() -> Report:
    report = Report("Proof of GPU: operator check and agent answer", COMMAND)
    rng = random.Random(1)

    # The agent's answer on the fake engine, against the operator's check of it.
    challenge, shape = _dev_challenge(8)
    prover = ArrayProver(np, "numpy")
    samples = draw_samples(challenge, 16, rng.randrange)

    def answer() -> None:
        prover.commit(challenge, "bench-node", {})
        prover.open(samples)

    answered = sample(answer, repeat=20, warmup=2)
    roots = prover.commit(challenge, "bench-node", {})
    openings = prover.open(samples)

    def check() -> None:
        for o in openings:
            assert opening_problem(challenge, "bench-node", roots[o.gpu], o) is None

    checked = sample(check, repeat=20, warmup=2)
    report.rows.append(
        Row(
            f"operator check vs agent answer, dev size (8 GPUs, {shape.rows}x{shape.inner}"
            f"x{shape.cols}, 128 samples)",
            checked,
            answered,
        )
    )

    # The operator's check at full size: one 8 x H100 node, 16 samples per GPU.
    full = shape_for(H100, ProofSettings.of(OperatorSettings()))
    keys = Keys.of("cd" * 32, "bench-node", H100.uuid)
    path = bytes(32 * full.depth)
    leaf = [0] * 16

    def check_full() -> None:
        for _ in range(128):
            row, col = rng.randrange(full.rows), rng.randrange(full.cols)
            root_of_opening(full, row, col, leaf, path)
            entry(keys, full, row, col)

    full_check = sample(check_full, repeat=5, warmup=1)
    report.rows.append(
        Row(
            f"operator check, full size (8x H100: {full.rows}x{full.inner}x{full.cols}, "
            f"128 samples, depth {full.depth})",
            full_check,
            target=f"<= {CHECK_TARGET_S:.0f} s",
            met=full_check.p99 <= CHECK_TARGET_S,
        )
    )

    # The leaf hash on arrays (what the GPU runs) against hashlib one leaf at a time.
    leaves = np.random.default_rng(2).integers(0, 2**32, (65536, 16), dtype=np.uint64)
    words = leaves.astype(np.uint32)
    raw = [bytes(w.astype(">u4").tobytes()) for w in words]
    arrays = sample(lambda: sha256_64(np, words), repeat=10, warmup=1)
    loop = sample(lambda: [hashlib.sha256(m).digest() for m in raw], repeat=10, warmup=1)
    report.rows.append(Row("SHA-256 of 65536 leaves: NumPy arrays vs hashlib loop", arrays, loop))
    report.notes += [
        "Dev size is what `make up` and the e2e tests ask (GPUMESH_PROOF_SIDE=64, "
        "GPUMESH_PROOF_SCALE=1e-4); full size is the shipped default for an H100 80GB.",
        "The full-size check times what the operator does per sample: regenerate one row of "
        "A and one column of B, one dot product, and a Merkle path of full depth (a dummy "
        "path: the hashing costs the same whether or not it leads to the root).",
        "On a CPU the array SHA-256 is only a way to share one implementation with the "
        "GPU, where the leaves are hashed in parallel; the agent on the fake engine uses it.",
    ]
    return report
