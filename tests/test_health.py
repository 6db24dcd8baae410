"""The GPU health state machine: every fault, the hysteresis, and every way back."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpumesh.api.gpunode import GPUHealth
from gpumesh.node_agent.health import (
    GpuHealthState,
    HealthPolicy,
    Observation,
    describe_xid,
    needs_taint,
    node_health,
    step,
)
from gpumesh.node_agent.nvml.types import (
    CLOCK_EVENT_GPU_IDLE,
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_SW_POWER_CAP,
    CLOCK_EVENT_SW_THERMAL,
    RECOVERY_DRAIN_P2P,
    RECOVERY_GPU_RESET,
    RECOVERY_NODE_REBOOT,
    RECOVERY_NONE,
    DeviceSample,
    EccCounts,
    RemappedRows,
)

POLICY = HealthPolicy()
INTERVAL = 5.0


def good(**changes: object) -> Observation:
    """A clean reading of GPU 0 (old driver: no recovery-action field)."""
    sample = DeviceSample(
        index=0,
        temperature_c=55,
        power_w=300.0,
        power_limit_w=700.0,
        ecc=EccCounts(0, 0, 0, 0),
        remapped_rows=RemappedRows(0, 0, pending=False, failure=False),
        clock_event_reasons=0,
    )
    return Observation(sample=replace(sample, **changes))  # type: ignore[arg-type]


def with_xids(obs: Observation, *xids: int) -> Observation:
    return replace(obs, xids=tuple(xids))


def run(
    observations: Iterable[Observation],
    *,
    state: GpuHealthState | None = None,
    start: float = 0.0,
    interval: float = INTERVAL,
    policy: HealthPolicy = POLICY,
) -> list[GpuHealthState]:
    """Feed observations one sweep apart; return every state after each."""
    current = state or GpuHealthState()
    out = []
    t = start
    for obs in observations:
        current = step(current, obs, t, policy)
        out.append(current)
        t += interval
    return out


def healths(states: list[GpuHealthState]) -> list[GPUHealth]:
    return [s.health for s in states]


def settled(obs: Observation | None = None, sweeps: int = 1) -> GpuHealthState:
    return run([obs or good()] * sweeps)[-1]


# --- first reading -----------------------------------------------------------------------


def test_a_gpu_starts_unknown_and_takes_its_first_verdict_at_once() -> None:
    assert GpuHealthState().health == "Unknown"
    state = settled()
    assert state.health == "Healthy"
    assert state.reasons == ()
    assert state.since == 0.0


# --- each fault --------------------------------------------------------------------------


def test_gpu_fallen_off_the_bus_is_lost_at_once() -> None:
    state = step(settled(), with_xids(Observation(lost=True), 79), 5.0, POLICY)
    assert state.health == "Lost"
    assert any("fell off the bus" in r for r in state.reasons)


def test_xid_79_while_the_gpu_still_answers_needs_a_reset() -> None:
    state = step(settled(), with_xids(good(), 79), 5.0, POLICY)
    assert state.health == "NeedsReset"
    assert state.reasons[0].startswith("XID 79: GPU fell off the bus")


@pytest.mark.parametrize("xid", sorted(POLICY.reset_xids))
def test_every_reset_class_xid_needs_a_reset(xid: int) -> None:
    state = step(settled(), with_xids(good(), xid), 5.0, POLICY)
    assert state.health == "NeedsReset"
    assert describe_xid(xid) in state.reasons[0]


def test_double_bit_ecc_error_needs_a_reset_until_the_volatile_count_clears() -> None:
    states = run(
        [good()]
        + [good(ecc=EccCounts(0, 1, 0, 1))] * 4
        + [good(ecc=EccCounts(0, 0, 0, 1))] * 3  # the reset zeroed the volatile count
    )
    assert healths(states) == ["Healthy"] + ["NeedsReset"] * 6 + ["Healthy"]
    assert "uncorrectable ECC" in states[1].reasons[0]


def test_pending_row_remap_needs_a_reset_and_a_failed_one_is_unhealthy() -> None:
    pending = good(remapped_rows=RemappedRows(0, 1, pending=True, failure=False))
    failed = good(remapped_rows=RemappedRows(0, 1, pending=False, failure=True))
    assert step(settled(), pending, 5.0, POLICY).health == "NeedsReset"
    state = step(settled(), failed, 5.0, POLICY)
    assert state.health == "Unhealthy"
    assert "replacing" in state.reasons[0]


def test_thermal_throttling_degrades_only_when_it_persists() -> None:
    hot = good(
        temperature_c=93, clock_event_reasons=CLOCK_EVENT_SW_THERMAL | CLOCK_EVENT_HW_THERMAL
    )
    states = run([good(), hot, hot, hot])
    assert healths(states) == ["Healthy", "Healthy", "Degraded", "Degraded"]
    assert any("sw_thermal_slowdown" in r for r in states[-1].reasons)
    assert any("93 C" in r for r in states[-1].reasons)


def test_idle_and_power_cap_clock_reasons_are_not_faults() -> None:
    relaxed = good(clock_event_reasons=CLOCK_EVENT_GPU_IDLE | CLOCK_EVENT_SW_POWER_CAP)
    assert healths(run([relaxed] * 5)) == ["Healthy"] * 5


def test_reset_required_error_needs_a_reset() -> None:
    obs = Observation(reset_required=True, error="Reset Required")
    assert step(settled(), obs, 5.0, POLICY).health == "NeedsReset"


def test_driver_recovery_action_is_preferred_over_the_xid_list() -> None:
    modern = good(recovery_action=RECOVERY_NONE)
    # The driver says no reset is needed after XID 48: trust it.
    assert step(settled(modern), with_xids(modern, 48), 5.0, POLICY).health == "Healthy"
    asks = good(recovery_action=RECOVERY_GPU_RESET)
    assert step(settled(modern), with_xids(asks, 48), 5.0, POLICY).health == "NeedsReset"
    reboot = step(settled(modern), good(recovery_action=RECOVERY_NODE_REBOOT), 5.0, POLICY)
    assert reboot.health == "NeedsReset"
    assert "reboot the node" in reboot.reasons[0]


def test_drain_p2p_recovery_action_only_degrades() -> None:
    state = step(settled(), good(recovery_action=RECOVERY_DRAIN_P2P), 5.0, POLICY)
    assert state.health == "Degraded"
    assert "peer-to-peer" in state.reasons[0]


@pytest.mark.parametrize("xid", sorted(POLICY.app_xids))
def test_application_xids_alone_change_nothing(xid: int) -> None:
    assert step(settled(), with_xids(good(), xid), 5.0, POLICY).health == "Healthy"


def test_application_xids_escalate_on_repetition_within_the_window() -> None:
    states = run([with_xids(good(), 13)] * 10)
    assert healths(states) == ["Healthy"] * 2 + ["Degraded"] * 7 + ["Unhealthy"]
    assert "10 application XID(s) (13)" in states[-1].reasons[0]


def test_application_xids_spread_wider_than_the_window_never_escalate() -> None:
    spaced = run([with_xids(good(), 31)] * 10, interval=POLICY.app_xid_window_s / 2 + 1)
    assert set(healths(spaced)) == {"Healthy"}


def test_reset_class_faults_repeating_within_an_hour_make_the_gpu_unhealthy() -> None:
    modern = good(recovery_action=RECOVERY_NONE)
    storm = [with_xids(good(recovery_action=RECOVERY_GPU_RESET), 119), modern, modern, modern]
    states = run(storm * 3, interval=60)
    assert states[-1].health == "Unhealthy"
    assert "3 reset-class faults" in states[-1].reasons[0]


def test_unlisted_xids_are_counted_elsewhere_but_do_not_change_health() -> None:
    assert step(settled(), with_xids(good(), 62), 5.0, POLICY).health == "Healthy"


def test_the_xid_policy_is_configurable() -> None:
    strict = HealthPolicy(reset_xids=POLICY.reset_xids | {13}, app_xids=POLICY.app_xids - {13})
    assert step(settled(), with_xids(good(), 13), 5.0, strict).health == "NeedsReset"
    with pytest.raises(ValueError, match="both reset-class and application"):
        HealthPolicy(reset_xids=frozenset({13}), app_xids=frozenset({13}))
    with pytest.raises(ValueError, match="recover_after_sweeps"):
        HealthPolicy(recover_after_sweeps=0)


# --- unreadable GPUs ---------------------------------------------------------------------


def test_one_failed_read_holds_the_verdict_and_two_make_it_unknown() -> None:
    failing = Observation(error="Unknown Error")
    states = run([good(), failing, failing, good()])
    assert healths(states) == ["Healthy", "Healthy", "Unknown", "Healthy"]
    assert "cannot read the GPU: Unknown Error" in states[2].reasons[0]


def test_a_gpu_never_read_stays_unknown() -> None:
    state = step(GpuHealthState(), Observation(error="NVML unavailable"), 0.0, POLICY)
    assert state.health == "Unknown"


def test_xids_received_during_a_failed_read_are_not_forgotten() -> None:
    held = step(settled(), with_xids(Observation(error="busy"), 48), 5.0, POLICY)
    assert held.health == "Healthy"
    assert held.xid_latch is not None
    assert step(held, good(), 10.0, POLICY).health == "NeedsReset"


# --- hysteresis and recovery ---------------------------------------------------------------


def test_recovery_needs_consecutive_good_sweeps() -> None:
    hot = good(temperature_c=95)
    states = run([good(), hot, hot, good(), good(), hot, good(), good(), good()])
    assert healths(states) == [
        "Healthy",
        "Healthy",
        "Degraded",
        "Degraded",  # 1 of 3
        "Degraded",  # 2 of 3
        "Degraded",  # a relapse starts the count again
        "Degraded",
        "Degraded",
        "Healthy",
    ]
    assert states[3].reasons[0] == "recovering: 1 of 3 good sweeps"


def test_alternating_readings_do_not_flap() -> None:
    hot = good(temperature_c=95)
    states = run([hot, hot] + [good(), hot] * 20)[1:]
    assert {s.health for s in states} == {"Degraded"}


def test_a_lost_gpu_that_answers_again_was_reset_and_recovers() -> None:
    lost = with_xids(Observation(lost=True), 79)
    states = run([good(), lost, Observation(lost=True), good(), good(), good()])
    assert healths(states) == ["Healthy", "Lost", "Lost", "Lost", "Lost", "Healthy"]
    assert states[3].reasons[0].startswith("recovering")


def test_recovery_action_returning_to_none_clears_a_reset() -> None:
    asks = good(recovery_action=RECOVERY_GPU_RESET)
    fine = good(recovery_action=RECOVERY_NONE)
    states = run([fine, with_xids(asks, 48), asks, fine, fine, fine])
    assert healths(states) == ["Healthy"] + ["NeedsReset"] * 4 + ["Healthy"]


def test_an_xid_reset_without_evidence_clears_after_the_quiet_period() -> None:
    policy = HealthPolicy(reset_quiet_s=60.0)
    states = run([good(), with_xids(good(), 48)] + [good()] * 20, policy=policy)
    flipped = next(i for i, s in enumerate(states) if i > 1 and s.health == "Healthy")
    # 60 s quiet is 12 sweeps after the XID at sweep 1, then 3 good sweeps.
    assert flipped == 1 + 12 + 2
    assert all(s.health == "NeedsReset" for s in states[1:flipped])


def test_the_since_time_moves_only_on_a_change() -> None:
    states = run([good(), good(), good(temperature_c=99), good(temperature_c=99)])
    assert [s.since for s in states] == [0.0, 0.0, 0.0, 15.0]


NOISE = st.sampled_from(
    [
        good(),
        good(temperature_c=97, clock_event_reasons=CLOCK_EVENT_HW_THERMAL),
        with_xids(good(), 13),
        with_xids(good(), 48),
        with_xids(Observation(lost=True), 79),
        Observation(lost=True),
        Observation(error="Unknown Error"),
        Observation(reset_required=True),
        good(ecc=EccCounts(0, 2, 0, 2)),
        good(remapped_rows=RemappedRows(0, 1, pending=True, failure=False)),
        good(recovery_action=RECOVERY_GPU_RESET),
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(NOISE, max_size=40))
def test_no_history_leaves_a_gpu_stuck(history: list[Observation]) -> None:
    """Whatever happened, a GPU that reads clean for long enough is Healthy again."""
    state = run(history)[-1] if history else GpuHealthState()
    t = len(history) * INTERVAL
    quiet = max(POLICY.reset_quiet_s, POLICY.app_xid_window_s, POLICY.reset_repeat_window_s)
    clean = good(recovery_action=RECOVERY_NONE)
    state = step(state, clean, t, POLICY)
    after = run([clean] * (POLICY.recover_after_sweeps + 1), state=state, start=t + quiet)
    assert after[-1].health == "Healthy"


@settings(max_examples=200, deadline=None)
@given(st.lists(NOISE, max_size=40))
def test_every_step_down_follows_enough_good_sweeps(history: list[Observation]) -> None:
    from gpumesh.node_agent.health import SEVERITY

    states = run([good(), *history])
    for before, after in itertools.pairwise(states):
        if before.health != "Unknown" and SEVERITY[after.health] < SEVERITY[before.health]:
            assert before.below_sweeps == POLICY.recover_after_sweeps - 1


# --- the node ------------------------------------------------------------------------------


def test_node_health_is_its_worst_gpu() -> None:
    assert node_health(["Healthy", "Degraded", "Healthy"]) == "Degraded"
    assert node_health(["Healthy", "Lost", "NeedsReset"]) == "Lost"
    assert node_health(["Healthy", "Unknown"]) == "Unknown"
    assert node_health(["Unknown", "NeedsReset"]) == "NeedsReset"
    assert node_health([]) == "Unknown"
    assert node_health([], nvml_ok=True) == "Healthy"  # a CPU-only head node
    assert node_health(["Lost"], nvml_ok=True) == "Lost"


def test_only_unhealthy_or_lost_gpus_taint_the_node() -> None:
    assert needs_taint(["Healthy", "Lost"])
    assert needs_taint(["Unhealthy"])
    assert not needs_taint(["Degraded", "NeedsReset", "Unknown", "Healthy"])
