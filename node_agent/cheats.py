"""Lying agents for the dev fleet: each way a supplier might cheat its proof of GPU.

Only the fake NVML's nodes can cheat (a fleet node's ``cheat``); the tests show that the
operator catches every kind and the node stays unverified. Nothing here runs on a real
node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpumesh.api.gpunode import Challenge, Proof
from gpumesh.node_agent.kube import MERGE_PATCH, KubeApi, KubeError
from gpumesh.node_agent.nvml.fake import Cheat
from gpumesh.node_agent.prove import Tamper
from gpumesh.node_agent.report import GPUNODES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheatHooks:
    """How a :class:`~gpumesh.node_agent.prove.ProofRunner` plays a cheat."""

    tamper: Tamper | None = None
    delay_until: Callable[[Challenge], float | None] | None = None
    answer_for: Callable[[Challenge], Proof | None] | None = None


def _off_by_one(xp: Any, c: Any) -> Any:
    return c + xp.int32(1)


def _half_memory(xp: Any, c: Any) -> Any:
    c[c.shape[0] // 2 :] = 0
    return c


def _after_deadline(challenge: Challenge) -> float:
    return challenge.issued_time.timestamp() + challenge.deadline_seconds + 3.0


def tamper_for(cheat: Cheat | None) -> Tamper | None:
    """What the cheat does to the products it commits to, if anything."""
    return {Cheat.WRONG_ANSWER: _off_by_one, Cheat.SMALL_VRAM: _half_memory}.get(cheat)  # type: ignore[arg-type]


def hooks(cheat: Cheat | None, api: KubeApi | None, node: str) -> CheatHooks:
    if cheat is None:
        return CheatHooks()
    log.warning("this agent cheats its proof of GPU: %s", cheat.value)
    if cheat in (Cheat.WRONG_ANSWER, Cheat.SMALL_VRAM):
        return CheatHooks(tamper=tamper_for(cheat))
    if cheat is Cheat.TOO_SLOW:
        return CheatHooks(delay_until=_after_deadline)
    assert api is not None, "Replay and SelfGraded need the API"
    if cheat is Cheat.REPLAY:
        return CheatHooks(answer_for=lambda challenge: _someone_elses_proof(api, node))
    return CheatHooks(answer_for=lambda challenge: _grade_myself(api, node, challenge))


def _someone_elses_proof(api: KubeApi, node: str) -> Proof | None:
    listed = api.get(GPUNODES) or {}
    for item in listed.get("items") or []:
        if (item.get("metadata") or {}).get("name") == node:
            continue
        proof = (item.get("status") or {}).get("proof")
        if isinstance(proof, dict) and proof.get("roots"):
            return Proof.model_validate(proof)
    return None


def _grade_myself(api: KubeApi, node: str, challenge: Challenge) -> Proof | None:
    verdict = {"result": "Passed", "reason": "Verified", "challengeId": challenge.id}
    try:
        path = f"{GPUNODES}/{node}/status"
        api.request("PATCH", path, {"status": {"verification": verdict}}, content_type=MERGE_PATCH)
    except KubeError as err:
        log.warning("the API server refused my own Passed verdict: %s", err)
    else:
        log.error("the API server took a self-graded verdict: the admission policy is missing")
    return None
