"""kopf handlers: the only operator code that reacts to the API. Importing registers them."""

from gpumesh.operator.handlers import (
    clusters,
    gpucluster,
    indexes,
    job,
    leases,
    lifecycle,
    liveness,
    mesh,
    proof,
    reputation,
    supply,
)

__all__ = [
    "clusters",
    "gpucluster",
    "indexes",
    "job",
    "leases",
    "lifecycle",
    "liveness",
    "mesh",
    "proof",
    "reputation",
    "supply",
]
