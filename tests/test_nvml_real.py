"""The pynvml backend's error mapping and parsing, with pynvml's functions stubbed.

No GPU is needed: each test replaces the pynvml functions the backend calls. What the
real library reported on a real GPU is recorded in docs/node-agent.md when one was there.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from gpumesh.node_agent.nvml.real import FIELDS, PynvmlBackend, _field_value, map_error
from gpumesh.node_agent.nvml.types import (
    GpuLostError,
    GpuResetRequiredError,
    NvmlError,
    NvmlInitError,
)

HANDLES = [ctypes.c_void_p(0x1000), ctypes.c_void_p(0x2000)]


def err(code: int) -> Exception:
    e: Exception = pynvml.NVMLError(code)
    return e


def field(value: int, ret: int = 0) -> SimpleNamespace:
    return SimpleNamespace(nvmlReturn=ret, valueType=3, value=SimpleNamespace(ullVal=value))


class Stub:
    """The pynvml functions one test needs, installed with monkeypatch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.registered: list[tuple[Any, int]] = []
        self.calls: dict[str, Any] = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: 2,
            "nvmlSystemGetDriverVersion": lambda: "550.90.07",
            "nvmlSystemGetCudaDriverVersion": lambda: 12040,
            "nvmlDeviceGetHandleByIndex": lambda i: HANDLES[i],
            "nvmlDeviceGetUUID": lambda h: f"GPU-{h.value:08x}-0000-0000-0000-000000000000",
            "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(
                total=81559 * 2**20, used=1024 * 2**20
            ),
            "nvmlDeviceGetPciInfo": lambda h: SimpleNamespace(busId=b"00000000:18:00.0"),
            "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
            "nvmlDeviceGetTemperature": lambda h, sensor: 51,
            "nvmlDeviceGetPowerUsage": lambda h: 312_500,
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
            "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=87, memory=40),
            "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x20,
            "nvmlDeviceGetFieldValues": lambda h, ids: [
                field(3),  # SBE volatile
                field(1),  # DBE volatile
                field(0, ret=3),  # SBE aggregate: not supported
                field(2),  # DBE aggregate
                field(5),
                field(1),
                field(1),  # remap pending
                field(0),
                field(1),  # recovery action: reset
            ],
            "nvmlEventSetCreate": lambda: "event-set",
            "nvmlEventSetFree": lambda s: None,
            "nvmlDeviceGetSupportedEventTypes": lambda h: 0x8 | 0x4,
            "nvmlDeviceRegisterEvents": lambda h, mask, s: self.registered.append((h, mask)),
        }

    def set(self, name: str, fn: Any) -> None:
        self.calls[name] = fn

    def install(self) -> PynvmlBackend:
        for name, fn in self.calls.items():
            self.mp.setattr(pynvml, name, fn, raising=False)
        backend = PynvmlBackend()
        backend.init()
        return backend


def raiser(code: int) -> Any:
    def fn(*_args: object) -> Any:
        raise err(code)

    return fn


def test_missing_library_is_an_init_failure() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - a machine with a GPU
        pynvml.nvmlShutdown()
        pytest.skip("NVML is present here")
    with pytest.raises(NvmlInitError, match="nvmlInit failed"):
        PynvmlBackend().init()


def test_driver_not_loaded_is_an_init_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = Stub(monkeypatch)
    stub.set("nvmlInit", raiser(9))
    with pytest.raises(NvmlInitError) as info:
        stub.install()
    assert info.value.code == 9


def test_error_codes_map_to_our_errors() -> None:
    assert isinstance(map_error(err(15)), GpuLostError)
    assert isinstance(map_error(err(16)), GpuResetRequiredError)
    plain = map_error(err(999))
    assert type(plain) is NvmlError
    assert plain.code == 999


def test_identity_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Stub(monkeypatch).install()
    assert backend.device_count() == 2
    assert backend.driver_version() == "550.90.07"
    assert backend.cuda_version() == "12.4"
    ident = backend.identity(1)
    assert ident.uuid == "GPU-00002000-0000-0000-0000-000000000000"
    assert ident.memory_total_mib == 81559
    assert ident.pci_bus_id == "00000000:18:00.0"
    assert ident.compute_capability == "9.0"


def test_one_batched_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Stub(monkeypatch).install()
    s = backend.sample(0)
    assert (s.temperature_c, s.power_w, s.power_limit_w) == (51, 312.5, 700.0)
    assert (s.gpu_utilization_pct, s.memory_utilization_pct, s.memory_used_mib) == (87, 40, 1024)
    assert s.clock_event_reasons == 0x20
    assert s.ecc.volatile_correctable == 3
    assert s.ecc.volatile_uncorrectable == 1
    assert s.ecc.aggregate_correctable is None  # not supported is no error
    assert s.ecc.aggregate_uncorrectable == 2
    assert s.remapped_rows is not None
    assert s.remapped_rows.pending
    assert not s.remapped_rows.failure
    assert s.recovery_action == 1
    assert s.errors == ()


def test_unsupported_fields_are_none_and_other_failures_are_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stub = Stub(monkeypatch)
    stub.set("nvmlDeviceGetPowerUsage", raiser(3))  # not supported
    stub.set("nvmlDeviceGetTemperature", raiser(999))  # unknown error
    s = stub.install().sample(0)
    assert s.power_w is None
    assert s.temperature_c is None
    assert len(s.errors) == 1
    assert "nvmlDeviceGetTemperature" in s.errors[0]


@pytest.mark.parametrize(("code", "error"), [(15, GpuLostError), (16, GpuResetRequiredError)])
def test_a_lost_gpu_fails_the_whole_sample(
    monkeypatch: pytest.MonkeyPatch, code: int, error: type[Exception]
) -> None:
    stub = Stub(monkeypatch)
    stub.set("nvmlDeviceGetPowerUsage", raiser(code))
    with pytest.raises(error):
        stub.install().sample(0)


def test_older_drivers_without_field_values_use_the_classic_getters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stub = Stub(monkeypatch)
    stub.set("nvmlDeviceGetFieldValues", raiser(13))  # function not found
    stub.set("nvmlDeviceGetTotalEccErrors", lambda h, kind, counter: 10 * kind + counter)
    stub.set("nvmlDeviceGetRemappedRows", lambda h: (4, 0, 0, 1))
    s = stub.install().sample(0)
    assert s.ecc.volatile_uncorrectable == 10
    assert s.ecc.aggregate_correctable == 1
    assert s.remapped_rows is not None
    assert s.remapped_rows.failure
    assert s.recovery_action is None


def test_xid_events_are_registered_and_mapped_to_gpu_indices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[Any] = [
        err(10),  # timeout
        SimpleNamespace(eventType=0x8, eventData=79, device=HANDLES[1]),
    ]

    def wait(event_set: object, timeout_ms: int) -> Any:
        assert (event_set, timeout_ms) == ("event-set", 500)
        item = events.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    stub = Stub(monkeypatch)
    stub.set("nvmlEventSetWait_v2", wait)
    backend = stub.install()
    with pytest.raises(NvmlError, match="not watching"):
        backend.wait_xid(0.5)
    backend.watch_xids()
    assert [mask for _, mask in stub.registered] == [0x8, 0x8]
    assert backend.wait_xid(0.5) is None
    event = backend.wait_xid(0.5)
    assert event is not None
    assert (event.index, event.xid) == (1, 79)
    backend.shutdown()
    with pytest.raises(NvmlError):
        backend.device_count()


@pytest.mark.parametrize(
    ("value_type", "member", "raw", "expected"),
    [(0, "dVal", 1.5, 1.5), (4, "sllVal", -3, -3), (6, "usVal", 7, 7), (9, "ullVal", 1, None)],
)
def test_a_field_value_is_read_from_the_member_its_type_names(
    value_type: int, member: str, raw: float, expected: float | None
) -> None:
    value = SimpleNamespace(
        nvmlReturn=0, valueType=value_type, value=SimpleNamespace(**{member: raw})
    )
    assert _field_value(value) == expected


def test_fields_are_the_documented_nvml_ids() -> None:
    assert FIELDS == (
        pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
        pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
        pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
        pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
        pynvml.NVML_FI_DEV_REMAPPED_COR,
        pynvml.NVML_FI_DEV_REMAPPED_UNC,
        pynvml.NVML_FI_DEV_REMAPPED_PENDING,
        pynvml.NVML_FI_DEV_REMAPPED_FAILURE,
        pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION,
    )
    assert pynvml.nvmlEventTypeXidCriticalError == 0x8
