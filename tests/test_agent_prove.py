"""The agent's prover runner: one step per challenge, products kept only while the
operator may still name entries to open."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import numpy as np
import pytest

from gpumesh.api.gpunode import Challenge, ChallengeGpu, Opening, Proof, Sample
from gpumesh.clock import SystemClock
from gpumesh.node_agent import prove
from gpumesh.node_agent.prove import ArrayProver, ProofRunner


class CountingProver(ArrayProver):
    """NumPy products, counting what the runner asks for."""

    def __init__(self) -> None:
        super().__init__(np, "numpy")
        self.calls: list[str] = []

    def commit(self, challenge: Challenge, node: str, devices: Mapping[str, int]) -> list[str]:
        self.calls.append("commit")
        return super().commit(challenge, node, devices)

    def open(self, samples: Sequence[Sample]) -> list[Opening]:
        self.calls.append("open")
        return super().open(samples)

    def close(self) -> None:
        self.calls.append("close")
        super().close()


def challenge(**extra: object) -> Challenge:
    return Challenge.model_validate(
        {
            "id": "0123456789abcdef",
            "seed": "ab" * 32,
            "issuedTime": datetime(2026, 1, 1, tzinfo=UTC),
            "deadlineSeconds": 30,
            "gpus": [ChallengeGpu(uuid="GPU-1", rows=16, inner=10, cols=16)],
            **extra,
        }
    )


def settle(runner: ProofRunner) -> Proof | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with runner._lock:
            busy = runner._working_on is not None
        if not busy:
            return runner.result()
        time.sleep(0.01)
    raise AssertionError("the runner did not finish")


def test_products_are_dropped_when_no_entries_are_named_and_computed_again_if_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prove, "OPEN_WAIT_S", 0.2)
    prover = CountingProver()
    runner = ProofRunner(prover, "n1", SystemClock())
    runner.offer(challenge(), {"GPU-1": 0})
    proof = settle(runner)
    assert proof is not None and len(proof.roots) == 1
    runner.offer(challenge(), {"GPU-1": 0})  # the same challenge again: nothing to do
    time.sleep(0.4)
    # (commit clears what the prover held first, hence a close inside it)
    assert prover.calls == ["commit", "close", "close"]  # the products went after the wait
    runner.offer(challenge(), {"GPU-1": 0})  # still not opened: not computed again either
    settle(runner)
    assert prover.calls.count("commit") == 1
    samples = [Sample(gpu=0, row=3, col=5)]
    runner.offer(challenge(samples=samples, committedTime=datetime.now(UTC)), {"GPU-1": 0})
    opened = settle(runner)
    assert opened is not None and [(o.row, o.col) for o in opened.openings] == [(3, 5)]
    assert opened.roots == proof.roots
    assert prover.calls[-4:] == ["commit", "close", "open", "close"]


def test_the_child_process_answers_as_the_agent_would_and_exits_when_closed() -> None:
    """The child's plumbing (requests and replies over stdin and stdout, the products kept
    between them), run on NumPy: on a GPU node the same child runs CuPy."""
    samples = [Sample(gpu=0, row=0, col=0), Sample(gpu=0, row=15, col=9)]
    child = prove.ChildProver("numpy")
    roots = child.commit(challenge(), "n1", {"GPU-1": 0})
    openings = child.open(samples)
    process = child._child
    child.close()
    assert process is not None and process.returncode == 0
    here = ArrayProver(np, "numpy")
    assert roots == here.commit(challenge(), "n1", {"GPU-1": 0})
    assert openings == here.open(samples)


def test_a_child_that_hangs_is_killed_and_the_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prove, "CHILD_TIMEOUT_S", 0.5)
    child = prove.ChildProver("numpy")
    child._child = subprocess.Popen(  # a child that never answers
        ["sleep", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="without an answer"):
        child._ask({"samples": []})
    assert time.monotonic() - started < 5
    child.close()
