"""Setting kstatus conditions without churning their timestamps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gpumesh.api.base import Condition, ConditionStatus

#: kstatus: Ready is the summary; Reconciling and Stalled are "abnormal-true" conditions.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
DEGRADED = "Degraded"


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; the transition time moves only on a flip.

    Keeping the old time when nothing flipped is what lets a reconcile compare the new
    status with the old one and skip the write.
    """
    wanted: ConditionStatus = "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    since = (
        previous.last_transition_time if previous is not None and previous.status == wanted else now
    )
    updated = Condition(
        type=type_,
        status=wanted,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    others = [c for c in conditions if c.type != type_]
    return sorted([*others, updated], key=lambda c: c.type)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in conditions)
