"""Soft preferences: among nodes that pass every hard constraint, which is best.

A score is a sum of weighted terms in comparable units: one unit of ``price`` weight is
one US dollar per GPU-hour, the other terms are fractions in [0, 1]. Raising a weight
makes that preference win more often; none of them can break a hard constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpumesh.operator.placement.inventory import NodeOffer


@dataclass(frozen=True, slots=True)
class Weights:
    """How much each preference counts when ranking acceptable nodes."""

    price: float = 1.0
    """Per US dollar per GPU-hour: cheaper nodes first."""
    reputation: float = 0.5
    """Times the supplier's reputation (0 to 1)."""
    degraded: float = 1.0
    """Penalty for a node whose GPUs are Degraded."""
    locality: float = 0.3
    """Times the share of the cluster's workers already in the node's region."""
    strategy: float = 0.4
    """Pack: bonus for suppliers already used; Spread: penalty for them."""
    latency: float = 0.3
    """Times the worst known mesh round trip to chosen nodes over maxLatencyMs."""
    fragmentation: float = 0.2
    """Times the share of the node's GPUs left idle after placing: best fit first."""


DEFAULT_WEIGHTS = Weights()


def static_score(offer: NodeOffer, weights: Weights) -> float:
    """The part of a node's score that does not depend on the rest of the placement."""
    score = weights.reputation * offer.reputation - weights.price * float(offer.price_per_gpu_hour)
    if offer.health == "Degraded":
        score -= weights.degraded
    return score
