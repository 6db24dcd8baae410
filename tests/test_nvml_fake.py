"""The fake NVML: scripted GPUs and every scripted fault, on a manual clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpumesh.clock import ManualClock
from gpumesh.node_agent.collector import Collector, XidInbox
from gpumesh.node_agent.health import HealthPolicy
from gpumesh.node_agent.nvml.fake import (
    FakeGpu,
    FakeNvml,
    Fault,
    fake_from_fleet,
    fleet_node,
    load_fleet_node,
    power_limit_for,
)
from gpumesh.node_agent.nvml.types import (
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_SW_THERMAL,
    RECOVERY_GPU_RESET,
    RECOVERY_NONE,
    GpuLostError,
    NvmlError,
    NvmlInitError,
)

ROOT = Path(__file__).resolve().parent.parent


def fake(*faults: dict[str, Any], gpus: int = 2) -> tuple[FakeNvml, ManualClock]:
    clock = ManualClock()
    nvml = FakeNvml([FakeGpu()] * gpus, faults, clock=clock, node_name="n1")
    nvml.init()
    return nvml, clock


def test_gpus_have_stable_distinct_identities() -> None:
    nvml, _ = fake(gpus=3)
    ids = [nvml.identity(i) for i in range(nvml.device_count())]
    assert len({i.uuid for i in ids}) == 3
    assert len({i.pci_bus_id for i in ids}) == 3
    assert ids[0].name == "NVIDIA H100 80GB HBM3"
    assert ids[0].memory_total_mib == 81559
    assert ids[0].compute_capability == "9.0"
    again, _ = fake(gpus=3)
    assert again.identity(2) == ids[2]
    assert nvml.driver_version() == "550.90.07"
    assert nvml.cuda_version() == "12.4"


def test_calls_before_init_fail_like_nvml() -> None:
    nvml = FakeNvml([FakeGpu()], clock=ManualClock())
    with pytest.raises(NvmlError, match="Uninitialized"):
        nvml.device_count()


def test_curves_are_scriptable() -> None:
    gpu = FakeGpu(
        model="NVIDIA GeForce RTX 4090",
        memory_mib=24564,
        utilization=lambda t: 100.0 if t >= 10 else 0.0,
        temperature=lambda t: 30.0 + t,
    )
    clock = ManualClock()
    nvml = FakeNvml([gpu], clock=clock)
    nvml.init()
    idle = nvml.sample(0)
    clock.advance(20)
    busy = nvml.sample(0)
    assert (idle.temperature_c, busy.temperature_c) == (30, 50)
    assert idle.gpu_utilization_pct == 0
    assert busy.gpu_utilization_pct == 100
    assert idle.power_w is not None and busy.power_w is not None
    assert idle.power_w < busy.power_w <= power_limit_for(gpu.model) == 450.0
    assert busy.memory_used_mib is not None and busy.memory_used_mib < 24564


def test_xid_fault_is_delivered_at_its_time_in_order() -> None:
    nvml, clock = fake(
        {"atSeconds": 30, "gpuIndex": 1, "kind": "xid", "xidCode": 13},
        {"atSeconds": 10, "gpu": 0, "kind": "xid", "xid": 31},
    )
    nvml.watch_xids()
    assert nvml.wait_xid(5) is None
    assert clock.monotonic() == 5  # a manual clock moves instead of sleeping
    first = nvml.wait_xid(60)
    assert first is not None
    assert (first.index, first.xid, first.at) == (0, 31, 10)
    second = nvml.wait_xid(60)
    assert second is not None
    assert (second.index, second.xid) == (1, 13)
    assert nvml.wait_xid(60) is None


def test_xid_79_takes_the_gpu_off_the_bus_for_its_duration() -> None:
    nvml, clock = fake(
        {"atSeconds": 10, "gpuIndex": 1, "kind": "xid", "xidCode": 79, "durationSeconds": 20}
    )
    clock.advance(10)
    with pytest.raises(GpuLostError):
        nvml.sample(1)
    with pytest.raises(GpuLostError):
        nvml.identity(1)
    assert nvml.sample(0).index == 0  # the other GPU is fine
    event = nvml.wait_xid(0)
    assert event is not None
    assert event.xid == 79
    clock.advance(20)
    assert nvml.sample(1).recovery_action == RECOVERY_NONE


def test_double_bit_ecc_error_counts_and_raises_xid_48() -> None:
    nvml, clock = fake({"atSeconds": 5, "gpuIndex": 0, "kind": "ecc_dbe", "durationSeconds": 60})
    assert nvml.sample(0).ecc.volatile_uncorrectable == 0
    clock.advance(5)
    hit = nvml.sample(0)
    assert hit.ecc.volatile_uncorrectable == 1
    assert hit.ecc.aggregate_uncorrectable == 1
    assert hit.recovery_action == RECOVERY_GPU_RESET
    event = nvml.wait_xid(0)
    assert event is not None
    assert event.xid == 48
    clock.advance(60)  # the scripted reset
    after = nvml.sample(0)
    assert after.ecc.volatile_uncorrectable == 0
    assert after.ecc.aggregate_uncorrectable == 1
    assert after.recovery_action == RECOVERY_NONE


def test_pending_row_remap_raises_xid_63_until_reset() -> None:
    nvml, clock = fake(
        {"atSeconds": 0, "gpuIndex": 0, "kind": "row_remap_pending", "durationSeconds": 30}
    )
    rows = nvml.sample(0).remapped_rows
    assert rows is not None
    assert rows.pending
    assert rows.uncorrectable == 1
    event = nvml.wait_xid(0)
    assert event is not None
    assert event.xid == 63
    clock.advance(30)
    rows = nvml.sample(0).remapped_rows
    assert rows is not None
    assert not rows.pending
    assert rows.uncorrectable == 1


def test_thermal_fault_heats_and_throttles() -> None:
    nvml, clock = fake({"atSeconds": 1, "gpuIndex": 0, "kind": "thermal"})
    assert not (nvml.sample(0).clock_event_reasons or 0) & CLOCK_EVENT_HW_THERMAL
    clock.advance(1)
    hot = nvml.sample(0)
    assert hot.temperature_c is not None and hot.temperature_c >= 93
    assert hot.clock_event_reasons is not None
    assert hot.clock_event_reasons & CLOCK_EVENT_SW_THERMAL
    assert hot.clock_event_reasons & CLOCK_EVENT_HW_THERMAL
    assert nvml.sample(1).temperature_c is not None
    assert nvml.wait_xid(0) is None  # no XID for heat


def test_gpu_lost_without_an_xid() -> None:
    nvml, _ = fake({"atSeconds": 0, "gpuIndex": 0, "kind": "gpu_lost"})
    with pytest.raises(GpuLostError):
        nvml.sample(0)
    assert nvml.wait_xid(0) is None


def test_nvml_init_failure_fails_every_call_until_it_ends() -> None:
    clock = ManualClock()
    nvml = FakeNvml(
        [FakeGpu()],
        [{"atSeconds": 0, "kind": "nvml_init_failure", "durationSeconds": 10}],
        clock=clock,
    )
    with pytest.raises(NvmlInitError):
        nvml.init()
    clock.advance(10)
    nvml.init()
    assert nvml.device_count() == 1
    nvml.add_fault({"atSeconds": 20, "kind": "nvml_init_failure"})
    clock.advance(10)
    with pytest.raises(NvmlError, match="Driver Not Loaded"):
        nvml.sample(0)
    with pytest.raises(NvmlError):
        nvml.wait_xid(1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"atSeconds": 1, "kind": "meteor"}, "fault kind 'meteor'"),
        ({"atSeconds": -1, "kind": "thermal"}, "atSeconds"),
        ({"atSeconds": 1, "kind": "xid"}, "xidCode"),
        ({"atSeconds": 1, "kind": "thermal", "gpuIndex": "x"}, "gpuIndex"),
        ({"atSeconds": 1, "kind": "thermal", "durationSeconds": 0}, "durationSeconds"),
    ],
)
def test_bad_faults_are_explained(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fault.from_dict(raw)


def test_fault_for_a_gpu_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="GPU 5"):
        fake({"atSeconds": 1, "gpuIndex": 5, "kind": "thermal"})


def test_the_example_fleet_file_plays_its_nodes() -> None:
    script = load_fleet_node(ROOT / "examples" / "fleet.yaml", "atlas-h100-1")
    assert (script.supplier, script.region, script.price_per_gpu_hour) == (
        "atlas-dc",
        "us-east",
        "2.49",
    )
    assert len(script.gpus) == 8
    assert script.faults == (Fault(at_s=120, gpu=3, kind="xid", xid=79),)
    nvml = fake_from_fleet(script, clock=ManualClock())
    nvml.init()
    assert nvml.device_count() == 8
    head = load_fleet_node(ROOT / "examples" / "fleet.yaml", "atlas-head-0")
    assert head.gpus == ()
    with pytest.raises(KeyError, match="not in the fleet file"):
        fleet_node({"suppliers": []}, "nope")


def test_collector_walks_a_scripted_xid_79_through_lost_and_back() -> None:
    clock = ManualClock()
    nvml = FakeNvml(
        [FakeGpu()] * 2,
        [{"atSeconds": 10, "gpuIndex": 1, "kind": "xid", "xidCode": 79, "durationSeconds": 10}],
        clock=clock,
    )
    nvml.init()
    inbox = XidInbox()
    collector = Collector(nvml, "n1", clock, HealthPolicy(), inbox)
    seen = []
    for _ in range(8):
        while (event := nvml.wait_xid(0)) is not None:
            inbox.put(event)
        snap = collector.sweep()
        seen.append((snap.gpus[1].health, snap.health))
        clock.advance(5)
    assert seen == [
        ("Healthy", "Healthy"),
        ("Healthy", "Healthy"),
        ("Lost", "Lost"),  # t=10: XID 79, off the bus
        ("Lost", "Lost"),
        ("Lost", "Lost"),  # t=20: answers again (1 of 3)
        ("Lost", "Lost"),
        ("Healthy", "Healthy"),
        ("Healthy", "Healthy"),
    ]
    assert snap.gpus[1].xid_counts == ((79, 1),)
    assert snap.gpus[1].last_xid == 79
    assert snap.xids_total == 1


def test_collector_survives_nvml_init_failure_and_retries_with_backoff() -> None:
    clock = ManualClock()
    nvml = FakeNvml(
        [FakeGpu()],
        [{"atSeconds": 0, "kind": "nvml_init_failure", "durationSeconds": 5}],
        clock=clock,
    )
    collector = Collector(nvml, "n1", clock)
    first = collector.sweep()
    assert not first.nvml_ok
    assert first.health == "Unknown"
    assert "Driver Not Loaded" in (first.nvml_error or "")
    clock.advance(0.5)
    collector.sweep()
    assert nvml.init_calls == 1  # backing off, not hammering
    clock.advance(5)
    ok = collector.sweep()
    assert ok.nvml_ok
    assert ok.health == "Healthy"
    assert ok.driver_version == "550.90.07"


def test_collector_marks_gpus_unknown_when_nvml_dies_mid_run() -> None:
    clock = ManualClock()
    nvml = FakeNvml([FakeGpu()], [{"atSeconds": 10, "kind": "nvml_init_failure"}], clock=clock)
    collector = Collector(nvml, "n1", clock)
    assert collector.sweep().health == "Healthy"
    clock.advance(10)
    assert collector.sweep().gpus[0].health == "Healthy"  # one failure is held
    clock.advance(5)
    snap = collector.sweep()
    assert snap.gpus[0].health == "Unknown"
    assert snap.gpus[0].identity is not None  # identity is remembered for reports


def test_identities_are_read_again_after_nvml_comes_back() -> None:
    from dataclasses import replace

    from gpumesh.node_agent.nvml.types import DeviceIdentity

    class Swapped(FakeNvml):
        def identity(self, index: int) -> DeviceIdentity:
            ident = super().identity(index)
            return replace(ident, uuid=ident.uuid[:-4] + "beef") if self.init_calls > 1 else ident

    clock = ManualClock()
    nvml = Swapped(
        [FakeGpu()],
        [{"atSeconds": 10, "kind": "nvml_init_failure", "durationSeconds": 5}],
        clock=clock,
    )
    collector = Collector(nvml, "n1", clock)
    first = collector.sweep().gpus[0].uuid
    for _ in range(6):
        clock.advance(5)
        snap = collector.sweep()
    assert snap.nvml_ok
    assert snap.gpus[0].uuid == first[:-4] + "beef"
