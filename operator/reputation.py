"""A node's reputation, computed by the operator from what it saw (pure).

Suppliers never write it (the agent admission policy refuses them). The formula, also in
docs/security.md:

    uptime     = (up + prior / 2) / (up + down + prior)
    reputation = uptime x 0.95 ^ faults x 0.8 ^ failed challenges        (2 decimals)

``up`` and ``down`` are seconds the operator saw the node up (its agent reporting, its
GPUs not Lost) and down; ``faults`` counts its GPUs turning NeedsReset, Unhealthy or Lost;
all of them decay with a half-life (7 days by default), a rolling window kept in a few
numbers on the GPUNode (``status.track``) rather than a history. ``prior`` (1 hour) is a
new node's benefit of the doubt: it starts at 0.5 and earns the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from gpumesh.api.gpunode import GPUNodeStatus, Track, Verdict
from gpumesh.operator.settings import OperatorSettings

DOWN_HEALTH: Final = frozenset({"Lost", "Unknown"})
"""Health in which the node counts as down (no agent report, or its GPUs gone)."""
FAULT_HEALTH: Final = frozenset({"NeedsReset", "Unhealthy", "Lost"})
FAULT_FACTOR: Final = 0.95
FAILED_CHALLENGE_FACTOR: Final = 0.8


@dataclass(frozen=True)
class ReputationSettings:
    half_life: timedelta
    prior_s: float
    rewrite_after: timedelta
    """Write the record at least this often while it changes (so a restart loses little)."""

    def rewrite_after_for(self, node: str) -> timedelta:
        """``rewrite_after`` stretched by up to half, by a fraction fixed per node: nodes
        seen at the same moment (an operator start, a fleet joining) do not all come due
        at once, every period, in one burst of status writes."""
        if not node:
            return self.rewrite_after
        fraction = int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") / 2**32
        return self.rewrite_after * (1 + fraction / 2)

    @classmethod
    def of(cls, settings: OperatorSettings) -> ReputationSettings:
        """The operator's settings (defaults and ``GPUMESH_REPUTATION_*``) for the formula."""
        return cls(
            half_life=timedelta(seconds=settings.reputation_half_life_seconds),
            prior_s=settings.reputation_prior_seconds,
            rewrite_after=timedelta(seconds=settings.reputation_rewrite_seconds),
        )


def account(
    track: Track | None,
    health: str | None,
    now: datetime,
    settings: ReputationSettings,
    verdict: Verdict | None = None,
) -> Track:
    """The record brought up to ``now``: the time since it was last counted goes to up
    or down as the node then was, everything decays, and a new fault or failed proof of
    GPU is counted (each failed challenge once)."""
    up_now = health not in DOWN_HEALTH
    failed = verdict is not None and verdict.result == "Failed" and verdict.challenge_id
    judged = verdict.challenge_id if failed and verdict else None
    if track is None:
        return Track(
            updated_time=now,
            up=up_now,
            health=health,
            failed_challenges=1.0 if judged else 0.0,
            judged_challenge=judged,
        )
    elapsed = max(0.0, (now - track.updated_time).total_seconds())
    keep = 0.5 ** (elapsed / settings.half_life.total_seconds())
    up, down = track.up_seconds * keep, track.down_seconds * keep
    if track.up:
        up += elapsed
    else:
        down += elapsed
    fault = health in FAULT_HEALTH and track.health not in FAULT_HEALTH
    new_failure = judged is not None and judged != track.judged_challenge
    return Track(
        updated_time=now,
        up=up_now,
        up_seconds=up,
        down_seconds=down,
        faults=track.faults * keep + (1.0 if fault else 0.0),
        failed_challenges=track.failed_challenges * keep + (1.0 if new_failure else 0.0),
        health=health,
        judged_challenge=judged or track.judged_challenge,
    )


def score(track: Track, settings: ReputationSettings) -> float:
    """The formula in the module docstring."""
    uptime = (track.up_seconds + settings.prior_s / 2) / (
        track.up_seconds + track.down_seconds + settings.prior_s
    )
    value = uptime * FAULT_FACTOR**track.faults * FAILED_CHALLENGE_FACTOR**track.failed_challenges
    return round(min(1.0, max(0.0, float(value))), 2)


def step(
    status: GPUNodeStatus, now: datetime, settings: ReputationSettings, node: str = ""
) -> dict[str, Any] | None:
    """The status patch that brings reputation and its record up to date, or None.

    Written when the reputation (2 decimals) or whether the node is up changes, when a
    fault is counted, and otherwise at most every ``rewrite_after_for(node)``.
    """
    before = status.track
    track = account(before, status.health, now, settings, status.verification)
    reputation = score(track, settings)
    due = (
        before is None
        or reputation != status.reputation
        or track.up != before.up
        or track.faults > before.faults + 0.5
        or track.judged_challenge != before.judged_challenge
        or now - before.updated_time >= settings.rewrite_after_for(node)
    )
    if not due:
        return None
    return {
        "status": {
            "reputation": reputation,
            "track": track.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
    }
