"""GPU health: a pure per-GPU state machine with hysteresis, and the node's roll-up.

``step(state, observation, now, policy)`` returns the next state and does nothing else:
no NVML, no clock, no I/O, so every fault, the hysteresis and the recovery paths are
table-tested in microseconds.

How a GPU moves (severity order Healthy < Degraded < Unknown < NeedsReset < Unhealthy <
Lost; a node is as bad as its worst GPU):

- Escalation is immediate for hard faults: the GPU is lost, a reset-class XID, a volatile
  uncorrectable ECC count, a pending row remap, a driver asking for a reset, a failed row
  remap. Soft signals (thermal or power-brake throttling, a hot core) must persist for
  ``degrade_after_sweeps`` sweeps first, so one hot reading does not flap the node.
- Application XIDs (13, 31, 43, 45, 68, 94 by default) are the program's fault, not the
  GPU's: they only count, and escalate on repetition within a window (Degraded, then
  Unhealthy). Reset-class faults repeating within an hour make the GPU Unhealthy.
- Stepping down needs ``recover_after_sweeps`` sweeps in a row that all call for a lower
  state, so recovery is never one lucky reading. NeedsReset from an XID clears when a reset
  is seen (the GPU was lost and answers again, or the volatile ECC counts went back down),
  when the driver's recovery-action field says nothing is needed, or after a quiet period
  without new faults, so no GPU stays stuck the way the device plugin leaves them.
- A GPU that cannot be read is held as it was for one sweep and becomes Unknown after
  ``unknown_after_failures`` failed sweeps; the first good reading settles it at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final

from gpumesh.api.gpunode import GPUHealth
from gpumesh.node_agent.nvml.types import (
    CLOCK_EVENT_HW_POWER_BRAKE,
    CLOCK_EVENT_HW_SLOWDOWN,
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_NAMES,
    CLOCK_EVENT_SW_THERMAL,
    RECOVERY_BUS_RESET,
    RECOVERY_DRAIN_AND_RESET,
    RECOVERY_DRAIN_P2P,
    RECOVERY_GPU_RESET,
    RECOVERY_NODE_REBOOT,
    RECOVERY_RECOVER_IMEX_DOMAIN,
    RECOVERY_SYSTEM_REBOOT,
    DeviceSample,
)

SEVERITY: Final[dict[GPUHealth, int]] = {
    "Healthy": 0,
    "Degraded": 1,
    "Unknown": 2,
    "NeedsReset": 3,
    "Unhealthy": 4,
    "Lost": 5,
}
HEALTH_STATES: Final[tuple[GPUHealth, ...]] = tuple(SEVERITY)
TAINT_STATES: Final[frozenset[GPUHealth]] = frozenset({"Unhealthy", "Lost"})
"""GPU states that take the whole node out of scheduling (the gpu-unhealthy taint)."""

DEFAULT_RESET_XIDS: Final = frozenset({48, 63, 64, 74, 79, 92, 95, 119, 120, 140, 143})
DEFAULT_APP_XIDS: Final = frozenset({13, 31, 43, 45, 68, 94})
XID_DESCRIPTIONS: Final[dict[int, str]] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    63: "row remapping recorded",
    64: "row remapping failed",
    68: "video processor exception",
    74: "NVLink error",
    79: "GPU fell off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
    143: "GPU initialisation failure",
}
RECOVERY_ACTIONS: Final[dict[int, tuple[GPUHealth, str]]] = {
    RECOVERY_GPU_RESET: ("NeedsReset", "driver recovery action: reset the GPU"),
    RECOVERY_DRAIN_AND_RESET: ("NeedsReset", "driver recovery action: drain, then reset the GPU"),
    RECOVERY_BUS_RESET: ("NeedsReset", "driver recovery action: reset the PCIe bus"),
    RECOVERY_NODE_REBOOT: ("NeedsReset", "driver recovery action: reboot the node"),
    RECOVERY_SYSTEM_REBOOT: ("NeedsReset", "driver recovery action: power-cycle the system"),
    RECOVERY_DRAIN_P2P: ("Degraded", "driver recovery action: drain peer-to-peer work"),
    RECOVERY_RECOVER_IMEX_DOMAIN: ("Degraded", "driver recovery action: recover the IMEX domain"),
}
"""NVML_FI_DEV_GET_GPU_RECOVERY_ACTION values and what they make of the GPU."""
DEFAULT_THROTTLE_MASK: Final = (
    CLOCK_EVENT_HW_SLOWDOWN
    | CLOCK_EVENT_SW_THERMAL
    | CLOCK_EVENT_HW_THERMAL
    | CLOCK_EVENT_HW_POWER_BRAKE
)


def describe_xid(xid: int) -> str:
    """``XID 79: GPU fell off the bus``."""
    text = XID_DESCRIPTIONS.get(xid)
    return f"XID {xid}: {text}" if text else f"XID {xid}"


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds and the XID classification; defaults follow NVIDIA's XID catalogue."""

    reset_xids: frozenset[int] = DEFAULT_RESET_XIDS
    app_xids: frozenset[int] = DEFAULT_APP_XIDS
    app_xid_window_s: float = 600.0
    app_xid_degraded_count: int = 3
    app_xid_unhealthy_count: int = 10
    reset_repeat_count: int = 3
    reset_repeat_window_s: float = 3600.0
    throttle_mask: int = DEFAULT_THROTTLE_MASK
    hot_temperature_c: int = 90
    degrade_after_sweeps: int = 2
    recover_after_sweeps: int = 3
    reset_quiet_s: float = 900.0
    unknown_after_failures: int = 2
    use_recovery_action: bool = True
    """Trust the driver's recovery-action field over the static XID list where it exists."""

    def __post_init__(self) -> None:
        overlap = self.reset_xids & self.app_xids
        if overlap:
            raise ValueError(f"XIDs {sorted(overlap)} are both reset-class and application")
        for name in ("degrade_after_sweeps", "recover_after_sweeps", "unknown_after_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True)
class Observation:
    """What one sweep learnt about one GPU."""

    sample: DeviceSample | None = None
    lost: bool = False
    reset_required: bool = False
    error: str | None = None
    """Why the GPU could not be read (NVML down, a failing call), when it was not lost."""
    xids: tuple[int, ...] = ()
    """XIDs received for this GPU since the previous sweep, oldest first."""


@dataclass(frozen=True)
class GpuHealthState:
    """One GPU's verdict plus the little memory the hysteresis needs."""

    health: GPUHealth = "Unknown"
    reasons: tuple[str, ...] = ("not observed yet",)
    since: float | None = None
    """Monotonic time the current health was entered (None before the first sweep)."""
    below_sweeps: int = 0
    soft_sweeps: int = 0
    failed_sweeps: int = 0
    xid_latch: tuple[str, float] | None = None
    """A reset-class XID (reason, time) waiting for a reset."""
    reset_events: tuple[float, ...] = ()
    app_xids: tuple[tuple[int, float], ...] = field(default=())
    was_lost: bool = False
    last_dbe_volatile: int | None = None


@dataclass(frozen=True)
class _Level:
    health: GPUHealth
    reason: str


def _window(times: Iterable[float], now: float, span: float) -> tuple[float, ...]:
    return tuple(t for t in times if now - t < span)


def _sample_levels(s: DeviceSample, policy: HealthPolicy) -> list[_Level]:
    levels: list[_Level] = []
    rows = s.remapped_rows
    if rows is not None and rows.failure:
        levels.append(_Level("Unhealthy", "row remapping failed: the GPU needs replacing"))
    if rows is not None and rows.pending:
        levels.append(_Level("NeedsReset", "row remap pending: a GPU reset applies it"))
    dbe = s.ecc.volatile_uncorrectable
    if dbe:
        levels.append(_Level("NeedsReset", f"{dbe} uncorrectable ECC error(s) since last reset"))
    action = RECOVERY_ACTIONS.get(s.recovery_action or 0)
    if policy.use_recovery_action and action is not None:
        levels.append(_Level(*action))
    return levels


def _soft_reasons(s: DeviceSample, policy: HealthPolicy) -> list[str]:
    reasons: list[str] = []
    bits = (s.clock_event_reasons or 0) & policy.throttle_mask
    if bits:
        names = [name for bit, name in CLOCK_EVENT_NAMES.items() if bits & bit]
        reasons.append("clocks held down: " + ", ".join(names))
    if s.temperature_c is not None and s.temperature_c >= policy.hot_temperature_c:
        reasons.append(f"core at {s.temperature_c} C (limit {policy.hot_temperature_c} C)")
    return reasons


def _reset_seen(state: GpuHealthState, s: DeviceSample) -> bool:
    """Evidence that the GPU was reset since the last sweep."""
    if state.was_lost:
        return True
    dbe = s.ecc.volatile_uncorrectable
    return dbe is not None and state.last_dbe_volatile is not None and dbe < state.last_dbe_volatile


def _worst(levels: list[_Level]) -> GPUHealth:
    return max((lv.health for lv in levels), key=SEVERITY.__getitem__, default="Healthy")


def step(
    state: GpuHealthState, obs: Observation, now: float, policy: HealthPolicy
) -> GpuHealthState:
    """The GPU's next state after one sweep's observation at monotonic time ``now``."""
    sample = obs.sample
    readable = sample is not None and not obs.lost
    app = tuple((x, t) for x, t in state.app_xids if now - t < policy.app_xid_window_s)
    resets = _window(state.reset_events, now, policy.reset_repeat_window_s)
    latch = state.xid_latch
    if sample is not None and readable and _reset_seen(state, sample):
        latch = None
    field_rules = (
        policy.use_recovery_action and sample is not None and sample.recovery_action is not None
    )

    for xid in obs.xids:
        if xid in policy.reset_xids:
            resets += (now,)
            if not field_rules:
                latch = (describe_xid(xid), now)
        elif xid in policy.app_xids:
            app += ((xid, now),)

    levels: list[_Level] = []
    events: list[tuple[float, _Level]] = []
    if obs.lost:
        levels.append(_Level("Lost", "GPU fell off the bus (NVML: GPU is lost)"))
    if obs.reset_required:
        levels.append(_Level("NeedsReset", "NVML answers only after a GPU reset"))
    if latch is not None:
        quiet = now - max(latch[1], max(resets, default=latch[1])) >= policy.reset_quiet_s
        if quiet and readable:
            latch = None
        else:
            events.append((latch[1], _Level("NeedsReset", f"{latch[0]}; reset the GPU")))
    if len(resets) >= policy.reset_repeat_count:
        span = int(policy.reset_repeat_window_s)
        events.append(
            (resets[-1], _Level("Unhealthy", f"{len(resets)} reset-class faults in {span} s"))
        )
    if app:
        codes = ", ".join(str(c) for c in sorted({x for x, _ in app}))
        text = f"{len(app)} application XID(s) ({codes}) in {int(policy.app_xid_window_s)} s"
        if len(app) >= policy.app_xid_unhealthy_count:
            events.append((app[-1][1], _Level("Unhealthy", text)))
        elif len(app) >= policy.app_xid_degraded_count:
            events.append((app[-1][1], _Level("Degraded", text)))

    soft_sweeps = 0
    failed_sweeps = 0
    if sample is not None and readable:
        levels += _sample_levels(sample, policy)
        soft = _soft_reasons(sample, policy)
        soft_sweeps = state.soft_sweeps + 1 if soft else 0
        # Entering Degraded takes persistence; staying takes only one bad reading.
        already = state.health != "Unknown" and SEVERITY[state.health] >= SEVERITY["Degraded"]
        if soft and (soft_sweeps >= policy.degrade_after_sweeps or already):
            levels += [_Level("Degraded", r) for r in soft]
    elif not obs.lost and not obs.reset_required:
        failed_sweeps = state.failed_sweeps + 1
        if failed_sweeps < policy.unknown_after_failures and state.health != "Unknown":
            # One failed read proves nothing: hold the verdict, remember the new events.
            return replace(
                state,
                failed_sweeps=failed_sweeps,
                xid_latch=latch,
                reset_events=resets,
                app_xids=app,
            )
        levels.append(_Level("Unknown", f"cannot read the GPU: {obs.error or 'no data'}"))

    events.sort(key=lambda item: item[0], reverse=True)
    all_levels = levels + [lv for _, lv in events]
    target = _worst(all_levels)
    reasons = tuple(dict.fromkeys(lv.reason for lv in all_levels if lv.health != "Healthy"))

    current = state.health
    below = 0
    if (
        state.since is None
        or SEVERITY[target] >= SEVERITY[current]
        or (current == "Unknown" and readable)
    ):
        health = target
    else:
        below = state.below_sweeps + 1
        if below >= policy.recover_after_sweeps:
            health, below = target, 0
        else:
            health = current
            progress = f"recovering: {below} of {policy.recover_after_sweeps} good sweeps"
            reasons = (progress, *[r for r in state.reasons if not r.startswith("recovering")])

    dbe = sample.ecc.volatile_uncorrectable if sample is not None and readable else None
    return GpuHealthState(
        health=health,
        reasons=reasons[:16],
        since=now if health != current or state.since is None else state.since,
        below_sweeps=below,
        soft_sweeps=soft_sweeps,
        failed_sweeps=failed_sweeps,
        xid_latch=latch,
        reset_events=resets,
        app_xids=app,
        was_lost=obs.lost or (state.was_lost and not readable),
        last_dbe_volatile=dbe if dbe is not None else state.last_dbe_volatile,
    )


def node_health(gpus: Iterable[GPUHealth], *, nvml_ok: bool = False) -> GPUHealth:
    """The node is as healthy as its worst GPU.

    With no GPU seen it is Unknown, unless NVML answered and found none: then it is a
    healthy CPU-only node (a Ray head host), not a GPU node in doubt.
    """
    return max(gpus, key=SEVERITY.__getitem__, default="Healthy" if nvml_ok else "Unknown")


def needs_taint(gpus: Iterable[GPUHealth]) -> bool:
    """True while any GPU is Unhealthy or Lost."""
    return any(h in TAINT_STATES for h in gpus)
