"""Heartbeat Leases (coordination.k8s.io/v1): the one way gpumesh writes and reads them.

The node agents renew one each (the operator marks a node Lost when it lapses); the
operator renews its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any


def micro_time(t: datetime) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(
    name: str,
    namespace: str,
    *,
    holder: str,
    duration_s: int,
    now: datetime,
    labels: Mapping[str, str] | None = None,
    current: Mapping[str, Any] | None = None,
    acquired: datetime | None = None,
) -> dict[str, Any]:
    """The Lease renewed at ``now``. Its acquireTime stays while the holder does: from
    ``current`` (then the body also carries its resourceVersion, a write on what was read),
    else ``acquired``, else ``now``."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    spec_now = (current or {}).get("spec") or {}
    kept = spec_now.get("acquireTime") if spec_now.get("holderIdentity") == holder else None
    if current is not None:
        meta["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_s,
            "acquireTime": kept or micro_time(acquired or now),
            "renewTime": micro_time(now),
        },
    }


def lease_terms(lease: Mapping[str, Any]) -> tuple[str | None, int] | None:
    """(renewTime as written, leaseDurationSeconds) of a Lease; None without a positive
    whole duration (no telling when it lapses)."""
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
        return None
    renew = spec.get("renewTime")
    return (str(renew) if renew is not None else None), duration


def lease_expiry(lease: Mapping[str, Any]) -> datetime | None:
    """When the Lease lapses (renewTime + leaseDurationSeconds), or None if unreadable."""
    terms = lease_terms(lease)
    if terms is None or terms[0] is None:
        return None
    try:
        renewed = datetime.fromisoformat(terms[0].replace("Z", "+00:00"))
    except ValueError:
        return None
    return renewed + timedelta(seconds=terms[1])
