"""The real NVML backend over nvidia-ml-py (``import pynvml``).

Every pynvml error is turned into an :class:`NvmlError` here, so nothing above this module
sees a pynvml type: GPU_IS_LOST (15) becomes GpuLostError, RESET_REQUIRED (16)
GpuResetRequiredError, and a failing ``nvmlInit`` NvmlInitError. A field the GPU does not
support reads as None rather than as an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from typing import Any, Final

from gpumesh.node_agent.nvml.types import (
    MIB,
    DeviceIdentity,
    DeviceSample,
    EccCounts,
    GpuLostError,
    GpuResetRequiredError,
    NvmlError,
    NvmlInitError,
    RemappedRows,
    XidEvent,
)

NVML_SUCCESS: Final = 0
NVML_ERROR_NOT_SUPPORTED: Final = 3
NVML_ERROR_TIMEOUT: Final = 10
NVML_ERROR_FUNCTION_NOT_FOUND: Final = 13
NVML_ERROR_GPU_IS_LOST: Final = 15
NVML_ERROR_RESET_REQUIRED: Final = 16
_NOT_THERE: Final = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND})

# Field ids read in one nvmlDeviceGetFieldValues call per GPU (values from nvml.h).
FI_ECC_SBE_VOL_TOTAL: Final = 3
FI_ECC_DBE_VOL_TOTAL: Final = 4
FI_ECC_SBE_AGG_TOTAL: Final = 5
FI_ECC_DBE_AGG_TOTAL: Final = 6
FI_REMAPPED_COR: Final = 142
FI_REMAPPED_UNC: Final = 143
FI_REMAPPED_PENDING: Final = 144
FI_REMAPPED_FAILURE: Final = 145
FI_GPU_RECOVERY_ACTION: Final = 230
FIELDS: Final = (
    FI_ECC_SBE_VOL_TOTAL,
    FI_ECC_DBE_VOL_TOTAL,
    FI_ECC_SBE_AGG_TOTAL,
    FI_ECC_DBE_AGG_TOTAL,
    FI_REMAPPED_COR,
    FI_REMAPPED_UNC,
    FI_REMAPPED_PENDING,
    FI_REMAPPED_FAILURE,
    FI_GPU_RECOVERY_ACTION,
)
EVENT_XID_CRITICAL: Final = 0x8  # nvmlEventTypeXidCriticalError
NVML_TEMPERATURE_GPU: Final = 0


def _code(err: BaseException) -> int | None:
    value = getattr(err, "value", None)
    return value if isinstance(value, int) else None


def map_error(err: BaseException) -> NvmlError:
    """A pynvml error as one of ours."""
    code = _code(err)
    text = str(err) or type(err).__name__
    if code == NVML_ERROR_GPU_IS_LOST:
        return GpuLostError(text, code)
    if code == NVML_ERROR_RESET_REQUIRED:
        return GpuResetRequiredError(text, code)
    return NvmlError(text, code)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


_UNION_MEMBER: Final = {
    0: "dVal",
    1: "uiVal",
    2: "ulVal",
    3: "ullVal",
    4: "sllVal",
    5: "siVal",
    6: "usVal",
}
"""nvmlValueType_t -> the member of nvmlValue_t that holds the value."""


def _field_value(v: Any) -> float | int | None:
    if v.nvmlReturn != NVML_SUCCESS:
        if v.nvmlReturn == NVML_ERROR_GPU_IS_LOST:
            raise GpuLostError("GPU is lost", NVML_ERROR_GPU_IS_LOST)
        return None
    member = _UNION_MEMBER.get(int(v.valueType))
    if member is None:
        return None
    value = getattr(v.value, member)
    return float(value) if member == "dVal" else int(value)


def _int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


class PynvmlBackend:
    """NVML through pynvml. Import of pynvml is deferred to ``init`` so that a node without
    the library still runs the agent (as Unknown) instead of failing at start."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._lock = threading.Lock()
        # Held while waiting on the event set, so shutdown never frees it under a waiter.
        self._events_lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._event_set: Any = None
        self._index_by_address: dict[int, int] = {}

    # --- plumbing -------------------------------------------------------------------------

    def _lib(self) -> Any:
        if self._nvml is None:
            raise NvmlError("NVML is not initialised", 1)
        return self._nvml

    def _call(self, name: str, *args: Any) -> Any:
        lib = self._lib()
        try:
            return getattr(lib, name)(*args)
        except lib.NVMLError as err:
            raise map_error(err) from None

    def _optional(self, errors: list[str], name: str, *args: Any) -> Any:
        """A field read: None where unsupported; whole-device failures still raise."""
        try:
            return self._call(name, *args)
        except (GpuLostError, GpuResetRequiredError):
            raise
        except NvmlError as err:
            if err.code not in _NOT_THERE:
                errors.append(f"{name}: {err}")
            return None

    def _handle(self, index: int) -> Any:
        with self._lock:
            handle = self._handles.get(index)
        if handle is None:
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            with self._lock:
                self._handles[index] = handle
        return handle

    # --- NvmlBackend ---------------------------------------------------------------------

    def init(self) -> None:
        self.shutdown()
        try:
            import pynvml
        except ImportError as err:  # pragma: no cover - it is a dependency
            raise NvmlInitError(f"nvidia-ml-py is not installed: {err}") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise NvmlInitError(f"nvmlInit failed: {err}", _code(err)) from None
        except OSError as err:
            raise NvmlInitError(f"libnvidia-ml could not be loaded: {err}") from None
        self._nvml = pynvml

    def shutdown(self) -> None:
        lib, self._nvml = self._nvml, None
        with self._events_lock, self._lock:
            self._handles.clear()
            self._index_by_address.clear()
            event_set, self._event_set = self._event_set, None
            # Shutting down: a failure here has nobody left to tell.
            if lib is not None and event_set is not None:
                with contextlib.suppress(Exception):
                    lib.nvmlEventSetFree(event_set)
        if lib is None:
            return
        with contextlib.suppress(Exception):
            lib.nvmlShutdown()

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def cuda_version(self) -> str:
        v = int(self._call("nvmlSystemGetCudaDriverVersion"))
        return f"{v // 1000}.{(v % 1000) // 10}"

    def identity(self, index: int) -> DeviceIdentity:
        h = self._handle(index)
        errors: list[str] = []
        pci = self._optional(errors, "nvmlDeviceGetPciInfo", h)
        cc = self._optional(errors, "nvmlDeviceGetCudaComputeCapability", h)
        return DeviceIdentity(
            index=index,
            uuid=_text(self._call("nvmlDeviceGetUUID", h)),
            name=_text(self._call("nvmlDeviceGetName", h)),
            memory_total_mib=int(self._call("nvmlDeviceGetMemoryInfo", h).total) // MIB,
            pci_bus_id=None if pci is None else _text(pci.busId),
            compute_capability=None if cc is None else f"{cc[0]}.{cc[1]}",
        )

    def sample(self, index: int) -> DeviceSample:
        h = self._handle(index)
        errors: list[str] = []
        temp = self._optional(errors, "nvmlDeviceGetTemperature", h, NVML_TEMPERATURE_GPU)
        power_mw = self._optional(errors, "nvmlDeviceGetPowerUsage", h)
        limit_mw = self._optional(errors, "nvmlDeviceGetEnforcedPowerLimit", h)
        util = self._optional(errors, "nvmlDeviceGetUtilizationRates", h)
        mem = self._optional(errors, "nvmlDeviceGetMemoryInfo", h)
        reasons = self._optional(errors, "nvmlDeviceGetCurrentClocksEventReasons", h)
        fields = self._fields(h, errors)
        ecc = EccCounts(
            volatile_correctable=_int(fields.get(FI_ECC_SBE_VOL_TOTAL)),
            volatile_uncorrectable=_int(fields.get(FI_ECC_DBE_VOL_TOTAL)),
            aggregate_correctable=_int(fields.get(FI_ECC_SBE_AGG_TOTAL)),
            aggregate_uncorrectable=_int(fields.get(FI_ECC_DBE_AGG_TOTAL)),
        )
        remap_values = [fields.get(f) for f in FIELDS[4:8]]
        remapped = None
        if all(v is not None for v in remap_values):
            cor, unc, pending, failure = (int(v or 0) for v in remap_values)
            remapped = RemappedRows(cor, unc, bool(pending), bool(failure))
        return DeviceSample(
            index=index,
            temperature_c=None if temp is None else int(temp),
            power_w=None if power_mw is None else power_mw / 1000,
            power_limit_w=None if limit_mw is None else limit_mw / 1000,
            gpu_utilization_pct=None if util is None else int(util.gpu),
            memory_utilization_pct=None if util is None else int(util.memory),
            memory_used_mib=None if mem is None else int(mem.used) // MIB,
            ecc=ecc,
            remapped_rows=remapped,
            clock_event_reasons=None if reasons is None else int(reasons),
            recovery_action=_int(fields.get(FI_GPU_RECOVERY_ACTION)),
            errors=tuple(errors),
        )

    def _fields(self, handle: Any, errors: list[str]) -> dict[int, float | int | None]:
        """ECC, row-remap and recovery fields in one call; older drivers lack the batch
        call, and then the two classic getters stand in for it."""
        values = self._optional(errors, "nvmlDeviceGetFieldValues", handle, list(FIELDS))
        if values is not None:
            return {fid: _field_value(values[i]) for i, fid in enumerate(FIELDS)}
        out: dict[int, float | int | None] = {}
        for fid, (kind, counter) in {
            FI_ECC_SBE_VOL_TOTAL: (0, 0),
            FI_ECC_DBE_VOL_TOTAL: (1, 0),
            FI_ECC_SBE_AGG_TOTAL: (0, 1),
            FI_ECC_DBE_AGG_TOTAL: (1, 1),
        }.items():
            out[fid] = self._optional(errors, "nvmlDeviceGetTotalEccErrors", handle, kind, counter)
        rows = self._optional(errors, "nvmlDeviceGetRemappedRows", handle)
        if rows is not None:
            out.update(zip(FIELDS[4:8], rows, strict=True))
        return out

    def watch_xids(self) -> None:
        with self._events_lock:
            self._watch_xids()

    def _watch_xids(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(Exception):
                self._lib().nvmlEventSetFree(self._event_set)
            self._event_set = None
        event_set = self._call("nvmlEventSetCreate")
        index_by_address: dict[int, int] = {}
        for index in range(self.device_count()):
            h = self._handle(index)
            errors: list[str] = []
            supported = self._optional(errors, "nvmlDeviceGetSupportedEventTypes", h)
            if not supported or not int(supported) & EVENT_XID_CRITICAL:
                continue
            self._call("nvmlDeviceRegisterEvents", h, EVENT_XID_CRITICAL, event_set)
            index_by_address[_address(h)] = index
        with self._lock:
            self._event_set = event_set
            self._index_by_address = index_by_address

    def wait_xid(self, timeout_s: float) -> XidEvent | None:
        with self._events_lock:
            if self._event_set is None:
                raise NvmlError("not watching XID events", 1)
            try:
                data = self._call(
                    "nvmlEventSetWait_v2", self._event_set, max(0, int(timeout_s * 1000))
                )
            except NvmlError as err:
                if err.code == NVML_ERROR_TIMEOUT:
                    return None
                raise
        if not int(data.eventType) & EVENT_XID_CRITICAL:
            return None
        with self._lock:
            index = self._index_by_address.get(_address(data.device), -1)
        return XidEvent(index=index, xid=int(data.eventData), at=time.monotonic())
