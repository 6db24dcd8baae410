"""The operator's side of proof of GPU, step by step from the GPUNode status alone: what
it issues, what it times, what it samples and how it judges each way of cheating."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from gpumesh.api.gpunode import Challenge, GPUNodeStatus, Proof
from gpumesh.api.patch import apply_merge_patch
from gpumesh.node_agent.prove import ArrayProver, Tamper
from gpumesh.operator.proof import (
    VERIFIED,
    ProofSettings,
    Step,
    decide,
    fingerprint,
    is_verified,
)
from gpumesh.operator.reputation import ReputationSettings, account
from gpumesh.operator.settings import OperatorSettings

T0 = datetime(2026, 12, 1, tzinfo=UTC)
NODE = "atlas-h100-0"
SETTINGS = ProofSettings(
    side=32,
    vram_fill=0.75,
    scale=2e-6,
    samples=4,
    allowance=timedelta(seconds=10),
    slack=2.0,
    open_within=timedelta(seconds=30),
    retry_after=timedelta(minutes=10),
    recheck_mean=timedelta(days=1),
)


def gpu(index: int, model: str = "NVIDIA H100 80GB HBM3", memory: int = 81559) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-00000000-0000-0000-0000-00000000000{index}",
        "model": model,
        "memoryMib": memory,
        "health": "Healthy",
    }


class Seeded:
    """Entropy from a seeded generator, so each test draws the same seeds and samples."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)

    def token_hex(self, nbytes: int) -> str:
        return self.rng.randbytes(nbytes).hex()

    def randbelow(self, n: int) -> int:
        return self.rng.randrange(n)


class World:
    """A GPUNode status that the operator's steps and an agent's answers are applied to."""

    def __init__(self, gpus: int = 2, tamper: Tamper | None = None, seed: int = 7) -> None:
        self.status: dict[str, Any] = {"health": "Healthy", "gpus": [gpu(i) for i in range(gpus)]}
        self.now = T0
        self.entropy = Seeded(seed)
        self.prover = ArrayProver(np, "numpy", tamper)

    def typed(self) -> GPUNodeStatus:
        return GPUNodeStatus.model_validate(self.status)

    def step(self, **kwargs: Any) -> Step:
        step = decide(NODE, self.typed(), self.now, SETTINGS, self.entropy, **kwargs)
        if step.patch is not None:
            self.status = apply_merge_patch(self.status, step.patch["status"])
        return step

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @property
    def challenge(self) -> Challenge:
        return Challenge.model_validate(self.status["challenge"])

    def commit(self) -> None:
        devices = {g["uuid"]: g["index"] for g in self.status["gpus"]}
        roots = self.prover.commit(self.challenge, NODE, devices)
        self.answer(Proof(challenge_id=self.challenge.id, roots=roots))

    def open(self) -> None:
        proof = Proof.model_validate(self.status["proof"])
        openings = self.prover.open(self.challenge.samples)
        self.answer(proof.model_copy(update={"openings": openings}))

    def answer(self, proof: Proof) -> None:
        self.status["proof"] = proof.model_dump(mode="json", by_alias=True)

    def verdict(self) -> dict[str, Any]:
        return dict(self.status["verification"])

    def condition(self) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == VERIFIED)

    def honest_round(self) -> None:
        self.step()
        self.later(1)
        self.commit()
        self.step()
        self.later(1)
        self.open()
        self.step()


def test_an_honest_node_is_challenged_sampled_after_its_roots_and_verified() -> None:
    world = World()
    first = world.step()
    assert first.after == timedelta(seconds=world.challenge.deadline_seconds)
    assert world.verdict()["result"] == "Pending" and world.condition()["status"] == "False"
    assert [g.uuid for g in world.challenge.gpus] == [g["uuid"] for g in world.status["gpus"]]
    assert world.challenge.samples == []  # nothing is named before the roots are in
    assert world.step().patch is None  # waiting costs nothing
    world.later(2)
    world.commit()
    world.step()
    assert world.challenge.committed_time == world.now
    assert len(world.challenge.samples) == 2 * SETTINGS.samples
    world.later(1)
    world.open()
    world.step()
    verdict = world.verdict()
    assert (verdict["result"], verdict["reason"], verdict["seconds"]) == ("Passed", "Verified", 2)
    assert verdict["gpus"] == fingerprint(world.typed().gpus)
    assert world.condition()["status"] == "True"
    assert is_verified(world.typed())
    assert world.step().patch is None  # judged: nothing more until a re-check


def test_the_deadline_grows_with_the_work_at_the_models_least_rate() -> None:
    fast = World()
    fast.step()
    slow = World()
    slow.status["gpus"] = [gpu(0, "NVIDIA GeForce RTX 3090", 24576)]
    slow.step()
    work = slow.challenge.gpus[0]
    expected = 10 + 2 * 2 * work.rows * work.inner * work.cols / (24e12 / 2)
    assert slow.challenge.deadline_seconds == round(expected, 3)
    assert fast.challenge.gpus[0].inner > work.inner  # more memory, bigger product


def test_roots_after_the_deadline_fail_as_late_with_the_operators_own_timing() -> None:
    world = World()
    world.step()
    world.later(world.challenge.deadline_seconds + 1)
    world.commit()
    world.step()
    assert world.verdict()["reason"] == "Late"
    assert "the deadline was" in world.verdict()["message"]
    assert not is_verified(world.typed())


def test_roots_that_come_after_the_node_was_judged_unanswered_make_it_late() -> None:
    world = World()
    world.step()
    world.later(world.challenge.deadline_seconds + 0.1)
    world.step()
    judged = world.verdict()
    world.later(3)
    world.commit()
    world.step()
    late = world.verdict()
    assert (late["result"], late["reason"]) == ("Failed", "Late")
    assert late["checkedTime"] == judged["checkedTime"]  # the retry waits as it did
    assert world.condition()["reason"] == "Late"
    assert world.step().patch is None


def test_silence_fails_as_unanswered_and_another_nodes_answer_as_a_replay() -> None:
    world = World()
    world.step()
    world.later(world.challenge.deadline_seconds + 0.1)
    world.step()
    assert world.verdict()["reason"] == "Unanswered"
    copied = World()
    copied.step()
    copied.answer(Proof(challenge_id="feedfacefeedface", roots=["0" * 64, "1" * 64]))
    copied.later(copied.challenge.deadline_seconds + 0.1)
    copied.step(others={"feedfacefeedface": "nordic-a100-0"})
    assert copied.verdict()["reason"] == "Replay"
    assert "nordic-a100-0" in copied.verdict()["message"]


def test_a_new_challenge_keeps_nothing_of_the_last_one() -> None:
    """Merge patches merge nested objects: a new challenge must clear the old commitment
    time and samples, or the old samples would be asked of the new roots."""
    world = World()
    world.honest_round()
    world.step(recheck=True)
    assert world.challenge.committed_time is None
    assert world.challenge.samples == []
    world.commit()
    world.step()
    assert world.challenge.committed_time == world.now and world.challenge.samples


def test_old_roots_under_a_new_challenge_are_a_replay() -> None:
    world = World()
    world.honest_round()
    old = Proof.model_validate(world.status["proof"])
    world.later(3600)
    world.step(recheck=True)
    assert is_verified(world.typed())  # still verified while it is re-checked
    world.answer(Proof(challenge_id=world.challenge.id, roots=old.roots))
    world.step()
    assert world.verdict()["reason"] == "Replay"
    assert not is_verified(world.typed())


def test_a_wrong_product_fails_naming_the_gpu_and_the_entry() -> None:
    world = World(tamper=lambda xp, c: c + xp.int32(1))
    world.honest_round()
    verdict = world.verdict()
    assert (verdict["result"], verdict["reason"]) == ("Failed", "WrongAnswer")
    assert verdict["message"].startswith("GPU GPU-") and ", not " in verdict["message"]
    assert world.condition()["reason"] == "WrongAnswer"


def test_openings_that_never_come_fail_as_late() -> None:
    world = World()
    world.step()
    world.commit()
    world.step()
    world.later(SETTINGS.open_within.total_seconds() + 1)
    world.step()
    assert world.verdict()["reason"] == "Late"
    assert "not opened" in world.verdict()["message"]


def test_a_node_whose_gpus_change_loses_its_verdict_until_they_pass_again() -> None:
    world = World()
    world.honest_round()
    assert is_verified(world.typed())
    world.status["gpus"] = [gpu(0), gpu(1), gpu(2)]
    assert not is_verified(world.typed())  # at once, before the operator even looks
    world.step()
    assert world.verdict()["reason"] == "GPUsChanged"
    assert len(world.challenge.gpus) == 3
    world.commit()
    world.step()
    world.open()
    world.step()
    assert is_verified(world.typed())


def test_a_failed_node_is_challenged_again_after_the_retry_time_only() -> None:
    world = World(tamper=lambda xp, c: c * xp.int32(0))
    world.honest_round()
    failed = world.challenge.id
    world.later(60)
    assert world.step().after == SETTINGS.retry_after - timedelta(seconds=60)
    world.later(SETTINGS.retry_after.total_seconds())
    world.step()
    assert world.challenge.id != failed
    assert world.verdict()["result"] == "Failed"  # it stays failed while re-checked


def test_a_gpu_the_catalogue_does_not_know_fails_once_without_a_challenge() -> None:
    world = World()
    world.status["gpus"] = [gpu(0, "NVIDIA H100 80GB HBM3", 24576)]
    world.step()
    assert world.verdict()["reason"] == "UnknownGPU"
    assert "not the 24576 MiB reported" in world.verdict()["message"]
    assert "challenge" not in world.status
    assert world.step().patch is None


def test_a_node_without_gpus_is_left_alone() -> None:
    world = World(gpus=0)
    assert world.step() == Step(None, None)


def test_a_cheater_right_on_a_share_f_of_rows_passes_about_f_to_the_k() -> None:
    """Two GPUs x 4 samples: k = 8 draws. Computing half the rows (a GPU with half the
    memory) passes with 0.5**8 = 0.4 %; over 100 independent challenges, more than 5 passes
    would be a 1-in-10^5 event for a sound protocol."""

    def half(xp: Any, c: Any) -> Any:
        c[c.shape[0] // 2 :] = 0
        return c

    passes = 0
    for seed in range(100):
        world = World(tamper=half, seed=seed)
        world.honest_round()
        passes += world.verdict()["result"] == "Passed"
    assert passes <= 5


def test_a_failed_challenge_costs_reputation_once() -> None:
    world = World(tamper=lambda xp, c: c + xp.int32(1))
    world.honest_round()
    status = world.typed()
    rep = ReputationSettings.of(OperatorSettings())
    track = account(None, "Healthy", T0, rep, status.verification)
    assert track.failed_challenges == 1.0
    again = account(track, "Healthy", T0 + timedelta(hours=1), rep, status.verification)
    assert again.failed_challenges < 1.0  # decayed, not counted twice
