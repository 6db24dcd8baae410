"""Proof of GPU as the operator runs it: issue a challenge, time the answer on its own
clock, draw the entries to open only after the roots are in, and judge (pure).

One step at a time, from the GPUNode status alone, so a restarted operator carries on
where the last one stopped:

1. no challenge for the GPUs the node reports now: issue one (a node whose GPUs changed
   loses its verdict until it passes again);
2. roots for it before ``issuedTime + deadlineSeconds``: note when they came and draw the
   samples (uniform entries of each GPU's product, from the CSPRNG);
3. openings for every sample: recompute each sampled entry and check its Merkle path;
   Passed, or Failed naming the first wrong entry;
4. a verdict on the current challenge: nothing to do until a failed node's retry time or a
   passed node's random re-check (the shell draws that).

What the arithmetic proves and what it cannot is in docs/security.md.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import ValidationError

from gpumesh.api.base import Condition
from gpumesh.api.catalogue import MEMORY_TOLERANCE, UUID_RE, sku_for
from gpumesh.api.conditions import set_condition
from gpumesh.api.gpunode import (
    Challenge,
    ChallengeGpu,
    GPUInfo,
    GPUNodeStatus,
    Proof,
    Verdict,
    VerdictReason,
)
from gpumesh.api.proof import (
    MAX_INNER,
    Shape,
    draw_samples,
    gpus_fingerprint,
    opening_problem,
)
from gpumesh.operator.settings import OperatorSettings

VERIFIED = "Verified"
"""The GPUNode condition that says whether, and why not, the node's GPUs are proven."""


@dataclass(frozen=True)
class ProofSettings:
    side: int
    """Rows of A and columns of B (a power of two)."""
    vram_fill: float
    """Share of a GPU's memory that A and B take at full scale."""
    scale: float
    """Shrinks every product (the dev fleet's CPU engine runs at 1e-4)."""
    samples: int
    """Entries opened per GPU: a cheater right on a share f of them passes with f**samples."""
    allowance: timedelta
    """Added to every deadline: API round trips and the agent's start."""
    slack: float
    """The deadline allows this many times the work at the model's least throughput."""
    open_within: timedelta
    retry_after: timedelta
    """A node that failed is challenged again after this."""
    recheck_mean: timedelta
    """Mean time between random re-checks of a passed node."""

    @classmethod
    def of(cls, settings: OperatorSettings) -> ProofSettings:
        return cls(
            side=settings.proof_side,
            vram_fill=settings.proof_vram_fill,
            scale=settings.proof_scale,
            samples=settings.proof_samples,
            allowance=timedelta(seconds=settings.proof_allowance_seconds),
            slack=settings.proof_slack,
            open_within=timedelta(seconds=settings.proof_open_seconds),
            retry_after=timedelta(seconds=settings.proof_retry_seconds),
            recheck_mean=timedelta(seconds=settings.proof_recheck_mean_seconds),
        )


class Entropy(Protocol):
    """Where seeds and samples come from: the CSPRNG, or a seeded one in tests."""

    def token_hex(self, nbytes: int) -> str: ...
    def randbelow(self, n: int) -> int: ...


class SystemEntropy:
    def token_hex(self, nbytes: int) -> str:
        return secrets.token_hex(nbytes)

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)


@dataclass(frozen=True)
class Step:
    """What to write (a status patch, or None) and when to look again (None: on events)."""

    patch: dict[str, Any] | None
    after: timedelta | None


def shape_for(gpu: GPUInfo, settings: ProofSettings) -> Shape:
    """The product a GPU of this memory computes: A and B fill ``vram_fill`` of it."""
    fill = settings.vram_fill * gpu.memory_mib * 2**20 * settings.scale
    inner = int(fill / (8 * settings.side))
    return Shape(settings.side, max(1, min(MAX_INNER, inner)), settings.side)


def deadline_for(gpus: Sequence[GPUInfo], settings: ProofSettings) -> timedelta:
    """Allowance plus ``slack`` times the slowest GPU's work at its model's least rate."""
    work = 0.0
    for gpu in gpus:
        sku = sku_for(gpu.model)
        assert sku is not None  # identity_problems refused unknown models before
        work = max(work, shape_for(gpu, settings).flops / sku.tf32_floor)
    return settings.allowance + timedelta(seconds=settings.slack * work)


def identity_problems(gpus: Sequence[GPUInfo]) -> list[str]:
    """What about the reported GPUs cannot be true, before any arithmetic."""
    problems: list[str] = []
    uuids = [g.uuid for g in gpus]
    if len(set(uuids)) != len(uuids):
        problems.append("two GPUs report the same UUID")
    for gpu in gpus:
        sku = sku_for(gpu.model)
        if not UUID_RE.match(gpu.uuid):
            problems.append(f"GPU {gpu.index}: malformed UUID {gpu.uuid!r}")
        if sku is None:
            problems.append(f"GPU {gpu.index}: {gpu.model} is not in the catalogue")
        elif abs(gpu.memory_mib - sku.memory_mib) > sku.memory_mib * MEMORY_TOLERANCE:
            problems.append(
                f"GPU {gpu.index}: {gpu.model} has {sku.memory_mib} MiB, "
                f"not the {gpu.memory_mib} MiB reported"
            )
    return problems


def fingerprint(gpus: Sequence[GPUInfo]) -> str:
    return gpus_fingerprint([(g.uuid, g.model, g.memory_mib) for g in gpus])


def is_verified(status: GPUNodeStatus) -> bool:
    """A Passed verdict about exactly the GPUs the node reports now."""
    verdict = status.verification
    return (
        verdict is not None
        and verdict.result == "Passed"
        and bool(status.gpus)
        and verdict.gpus == fingerprint(status.gpus)
    )


def decide(
    node: str,
    status: GPUNodeStatus,
    now: datetime,
    settings: ProofSettings,
    entropy: Entropy,
    *,
    recheck: bool = False,
    others: Mapping[str, str] | None = None,
) -> Step:
    """The next step for ``node`` (see the module docstring). ``recheck``: the shell's
    random draw says a passed node is due; ``others`` maps challenge ids issued to other
    nodes to those nodes (an answer naming one is a replay)."""
    gpus = sorted(status.gpus, key=lambda g: g.index)
    if not gpus:
        return Step(None, None)
    challenge, verdict = status.challenge, status.verification
    problems = identity_problems(gpus)
    if problems:
        if (
            verdict is not None
            and verdict.reason == "UnknownGPU"
            and verdict.gpus == fingerprint(gpus)
        ):
            return Step(None, None)
        return _judge(status, None, "Failed", "UnknownGPU", "; ".join(problems), now, gpus)
    current = challenge is not None and [g.uuid for g in challenge.gpus] == [g.uuid for g in gpus]
    if challenge is None or not current:
        changed = verdict is not None and verdict.gpus not in (None, fingerprint(gpus))
        return _issue(status, gpus, now, settings, entropy, changed=changed)
    if verdict is not None and verdict.challenge_id == challenge.id and verdict.result != "Pending":
        if verdict.result == "Failed":
            late = _late_roots(status, challenge, verdict, now)
            if late is not None:
                return late
            due = (verdict.checked_time or now) + settings.retry_after
            if now < due:
                return Step(None, due - now)
            return _issue(status, gpus, now, settings, entropy, changed=False)
        if recheck:
            return _issue(status, gpus, now, settings, entropy, changed=False)
        return Step(None, None)
    if challenge.committed_time is None or not challenge.samples:
        return _await_roots(node, status, challenge, gpus, now, settings, entropy, others or {})
    return _await_openings(node, status, challenge, gpus, now, settings)


def _issue(
    status: GPUNodeStatus,
    gpus: Sequence[GPUInfo],
    now: datetime,
    settings: ProofSettings,
    entropy: Entropy,
    *,
    changed: bool,
) -> Step:
    challenge = Challenge(
        id=entropy.token_hex(8),
        seed=entropy.token_hex(32),
        issued_time=now,
        deadline_seconds=round(deadline_for(gpus, settings).total_seconds(), 3),
        gpus=[
            ChallengeGpu(uuid=g.uuid, rows=s.rows, inner=s.inner, cols=s.cols)
            for g, s in ((g, shape_for(g, settings)) for g in gpus)
        ],
    )
    patch: dict[str, Any] = {"challenge": _dump(challenge)}
    verdict = status.verification
    if verdict is None or changed or (not is_verified(status) and verdict.result != "Failed"):
        # A passed node stays verified while it is re-checked; a failed one stays failed.
        reason: VerdictReason = "GPUsChanged" if changed else "Checking"
        message = (
            "the node's GPUs changed: unverified until they pass again"
            if changed
            else "challenge issued"
        )
        pending = Verdict(
            result="Pending",
            reason=reason,
            message=message,
            challenge_id=challenge.id,
            checked_time=now,
        )
        patch["verification"] = _dump(pending)
        patch["conditions"] = _conditions(status.conditions, pending, now)
    return Step({"status": patch}, timedelta(seconds=challenge.deadline_seconds))


def _await_roots(
    node: str,
    status: GPUNodeStatus,
    challenge: Challenge,
    gpus: Sequence[GPUInfo],
    now: datetime,
    settings: ProofSettings,
    entropy: Entropy,
    others: Mapping[str, str],
) -> Step:
    proof = status.proof
    deadline = challenge.issued_time + timedelta(seconds=challenge.deadline_seconds)
    taken = (now - challenge.issued_time).total_seconds()
    if proof is None or proof.challenge_id != challenge.id or not proof.roots:
        if now <= deadline:
            return Step(None, deadline - now)
        limit = f"{challenge.deadline_seconds:g} s"
        if proof is not None and proof.challenge_id in others:
            owner = others[proof.challenge_id]
            message = f"the answer is {owner}'s, to its challenge {proof.challenge_id}"
            return _judge(status, challenge, "Failed", "Replay", message, now, gpus)
        message = f"no roots within {limit}"
        if proof is not None and proof.challenge_id != challenge.id:
            message += f"; the last answer is to challenge {proof.challenge_id}"
        return _judge(status, challenge, "Failed", "Unanswered", message, now, gpus)
    if now > deadline:
        message = _late(challenge, taken)
        return _judge(status, challenge, "Failed", "Late", message, now, gpus, seconds=taken)
    if len(proof.roots) != len(challenge.gpus):
        message = f"{len(proof.roots)} roots for {len(challenge.gpus)} GPUs"
        return _judge(status, challenge, "Failed", "WrongAnswer", message, now, gpus)
    verdict = status.verification
    replayed = set(proof.roots) & set(verdict.roots if verdict else ())
    if replayed and verdict is not None:
        message = f"the roots are those of challenge {verdict.challenge_id}"
        return _judge(status, challenge, "Failed", "Replay", message, now, gpus)
    samples = draw_samples(challenge, settings.samples, entropy.randbelow)
    drawn = challenge.model_copy(update={"committed_time": now, "samples": samples})
    return Step({"status": {"challenge": _dump(drawn)}}, settings.open_within)


def _late_roots(
    status: GPUNodeStatus, challenge: Challenge, verdict: Verdict, now: datetime
) -> Step | None:
    """Roots that came after the node was judged Unanswered: the verdict says Late instead,
    with the time they took (a slow GPU, not a silent one). It stays failed."""
    proof = status.proof
    if verdict.reason != "Unanswered" or proof is None or proof.challenge_id != challenge.id:
        return None
    if not proof.roots:
        return None
    taken = (now - challenge.issued_time).total_seconds()
    late = verdict.model_copy(
        update={"reason": "Late", "message": _late(challenge, taken), "seconds": taken}
    )
    patch = {
        "verification": _dump(late),
        "conditions": _conditions(status.conditions, late, verdict.checked_time or now),
    }
    return Step({"status": patch}, None)


def _late(challenge: Challenge, taken: float) -> str:
    return f"roots came after {taken:.1f} s; the deadline was {challenge.deadline_seconds:g} s"


def _await_openings(
    node: str,
    status: GPUNodeStatus,
    challenge: Challenge,
    gpus: Sequence[GPUInfo],
    now: datetime,
    settings: ProofSettings,
) -> Step:
    assert challenge.committed_time is not None
    proof = status.proof
    taken = (challenge.committed_time - challenge.issued_time).total_seconds()
    opened = {
        (o.gpu, o.row, o.col): o
        for o in (
            proof.openings if proof is not None and proof.challenge_id == challenge.id else ()
        )
    }
    missing = [s for s in challenge.samples if (s.gpu, s.row, s.col) not in opened]
    if missing:
        due = challenge.committed_time + settings.open_within
        if now <= due:
            return Step(None, due - now)
        message = (
            f"{len(missing)} of {len(challenge.samples)} entries not opened within "
            f"{settings.open_within.total_seconds():g} s"
        )
        return _judge(status, challenge, "Failed", "Late", message, now, gpus, seconds=taken)
    assert proof is not None
    for sample in challenge.samples:
        opening = opened[(sample.gpu, sample.row, sample.col)]
        problem = opening_problem(challenge, node, proof.roots[sample.gpu], opening)
        if problem is not None:
            return _judge(status, challenge, "Failed", "WrongAnswer", problem, now, gpus, taken)
    message = (
        f"{len(challenge.samples)} sampled entries of {len(gpus)} GPUs' products right; "
        f"roots after {taken:.1f} s of {challenge.deadline_seconds:g} s"
    )
    return _judge(status, challenge, "Passed", "Verified", message, now, gpus, seconds=taken)


def _judge(
    status: GPUNodeStatus,
    challenge: Challenge | None,
    result: Any,
    reason: VerdictReason,
    message: str,
    now: datetime,
    gpus: Sequence[GPUInfo],
    seconds: float | None = None,
) -> Step:
    proof = status.proof
    verdict = Verdict(
        result=result,
        reason=reason,
        message=message,
        challenge_id=challenge.id if challenge else None,
        checked_time=now,
        gpus=fingerprint(gpus),
        seconds=round(seconds, 3) if seconds is not None else None,
        roots=list(proof.roots)
        if proof and challenge and proof.challenge_id == challenge.id
        else [],
    )
    patch = {
        "verification": _dump(verdict),
        "conditions": _conditions(status.conditions, verdict, now),
    }
    return Step({"status": patch}, None)


def _roots_for(proof: Proof | None, challenge: Challenge | None) -> list[str]:
    if proof is None or challenge is None or proof.challenge_id != challenge.id:
        return []
    return list(proof.roots)


def _conditions(conditions: Sequence[Condition], verdict: Verdict, now: datetime) -> list[Any]:
    updated = set_condition(
        conditions,
        VERIFIED,
        verdict.result == "Passed",
        verdict.reason,
        verdict.message or "",
        generation=None,
        now=now,
    )
    return [_dump(c) for c in updated]


def _dump(model: Any) -> Any:
    """Whole, with nulls: a merge patch must clear what the previous value had and this
    one has not (a new challenge has no committedTime yet)."""
    return model.model_dump(mode="json", by_alias=True)


def read_status(raw: Mapping[str, Any]) -> GPUNodeStatus | None:
    try:
        return GPUNodeStatus.model_validate(raw)
    except ValidationError:
        return None
