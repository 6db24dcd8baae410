"""kopf glue for proof of GPU: each GPUNode's challenge moved on by one step, and written.

GPUNode events enqueue the node; a worker thread runs :func:`~gpumesh.operator.proof.decide`
on the status as last delivered and writes what it says, then looks again when the step
asks (a deadline, a retry). A passed node is re-checked at random, at exponentially
distributed times; the next time is kept only here, which loses nothing on a restart: the
exponential distribution has no memory, so drawing again gives the same schedule odds.
"""

from __future__ import annotations

import logging
import random
import threading
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from kubernetes.client.exceptions import ApiException

from gpumesh.api.base import GROUP, VERSION
from gpumesh.operator import kube
from gpumesh.operator.proof import ProofSettings, SystemEntropy, decide, is_verified, read_status
from gpumesh.operator.settings import SETTINGS
from gpumesh.operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

PROOF = ProofSettings.of(SETTINGS)
_READ: Final = ("gpus", "challenge", "proof", "verification", "conditions")
_ENTROPY = SystemEntropy()
_RANDOM = random.SystemRandom()

_lock = threading.Lock()
_latest: dict[str, dict[str, Any]] = {}
"""Of each GPUNode's status as last delivered or written, what the proof reads (a cache)."""
_recheck_at: dict[str, datetime] = {}
_versions: dict[str, str] = {}
"""The resourceVersion each cached status was read at: every write is made on it, so a
step decided on a view the API has moved past is refused (409) and decided again when
the newer event arrives, never written over it (it would draw a challenge's samples
twice)."""
_owner: dict[str, str] = {}
"""Which node each current challenge was issued to (an answer naming another's is a replay)."""


@kopf.on.event(GROUP, VERSION, "gpunodes")
def proof_gpunode(
    type: str | None, name: str, status: kopf.Status, meta: kopf.Meta, **_: Any
) -> None:
    with _lock:
        _forget_challenge(name)
        if type == "DELETED":
            _latest.pop(name, None)
            _versions.pop(name, None)
            _recheck_at.pop(name, None)
            return
        _latest[name] = {k: status[k] for k in _READ if k in status}
        _versions[name] = str(meta.get("resourceVersion") or "")
        _note_challenge(name)
    QUEUE.add(name)


def _forget_challenge(node: str) -> None:
    challenge = (_latest.get(node) or {}).get("challenge")
    if isinstance(challenge, dict) and _owner.get(str(challenge.get("id"))) == node:
        del _owner[str(challenge.get("id"))]


def _note_challenge(node: str) -> None:
    challenge = (_latest.get(node) or {}).get("challenge")
    if isinstance(challenge, dict) and challenge.get("id"):
        _owner[str(challenge["id"])] = node


def _due_for_recheck(node: str, passed: bool, now: datetime) -> tuple[bool, float | None]:
    """Whether a passed node's random re-check is due, and how long until it is."""
    if not passed:
        _recheck_at.pop(node, None)
        return False, None
    at = _recheck_at.get(node)
    if at is None:
        wait = _RANDOM.expovariate(1.0 / PROOF.recheck_mean.total_seconds())
        at = _recheck_at[node] = datetime.fromtimestamp(now.timestamp() + wait, UTC)
    if now >= at:
        del _recheck_at[node]
        return True, None
    return False, (at - now).total_seconds()


def _needs_owners(raw: dict[str, Any] | None) -> bool:
    """Only an answer to some other challenge needs the owners (copied once, rarely)."""
    proof = (raw or {}).get("proof") or {}
    challenge = (raw or {}).get("challenge") or {}
    return bool(proof) and proof.get("challengeId") != challenge.get("id")


def _update(node: str) -> None:
    with _lock:
        raw = _latest.get(node)
        version = _versions.get(node)
        others = {c: n for c, n in _owner.items() if n != node} if _needs_owners(raw) else {}
    if raw is None:
        return  # deleted meanwhile
    status = read_status(raw)
    if status is None:
        log.warning("GPUNode %s: status unreadable, proof of GPU not moved on", node)
        return
    now = datetime.now(UTC)
    with _lock:
        recheck, recheck_in = _due_for_recheck(node, is_verified(status), now)
    step = decide(node, status, now, PROOF, _ENTROPY, recheck=recheck, others=others)
    if step.patch is not None:
        patch = {**step.patch, "metadata": {"resourceVersion": version}} if version else step.patch
        try:
            if not kube.shared().patch_cluster_status(GROUP, VERSION, "gpunodes", node, patch):
                return  # the GPUNode is gone
        except ApiException as err:
            if err.status != 409:
                raise
            log.debug("GPUNode %s changed since it was read; deciding again on its news", node)
            return
        with _lock:
            if node in _latest:
                _forget_challenge(node)
                _latest[node] = {**_latest[node], **step.patch["status"]}
                _note_challenge(node)
        _say(node, step.patch["status"])
    after = step.after.total_seconds() if step.after is not None else None
    waits = [w for w in (after, recheck_in) if w is not None]
    if waits:  # just past a deadline, so the next look finds it passed
        QUEUE.add(node, after=min(waits) + 0.05)


def _say(node: str, written: dict[str, Any]) -> None:
    challenge, verdict = written.get("challenge"), written.get("verification")
    if challenge is not None and challenge.get("samples"):
        log.info(
            "GPUNode %s: roots of challenge %s in; %d entries to open",
            node,
            challenge["id"],
            len(challenge["samples"]),
        )
    elif challenge is not None:
        log.info("GPUNode %s: challenge %s issued", node, challenge["id"])
    if verdict is not None and verdict.get("result") != "Pending":
        log.info("GPUNode %s: %s (%s)", node, verdict["reason"], verdict.get("message"))


QUEUE: WorkQueue[str] = WorkQueue(_update, workers=2, name="proof")


@kopf.on.startup()
def start_proof(**_: Any) -> None:
    QUEUE.start()


@kopf.on.cleanup()
def stop_proof(**_: Any) -> None:
    QUEUE.stop()
