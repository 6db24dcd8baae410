"""What the agent needs from NVML, as plain data: the backend protocol and its records.

Everything above this module (collection, health, metrics, reports) is written against
:class:`NvmlBackend`, so the real library and the scriptable fake are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

# Clock event ("throttle") reason bits, as NVML defines them.
CLOCK_EVENT_GPU_IDLE: Final = 0x1
CLOCK_EVENT_APP_CLOCKS: Final = 0x2
CLOCK_EVENT_SW_POWER_CAP: Final = 0x4
CLOCK_EVENT_HW_SLOWDOWN: Final = 0x8
CLOCK_EVENT_SYNC_BOOST: Final = 0x10
CLOCK_EVENT_SW_THERMAL: Final = 0x20
CLOCK_EVENT_HW_THERMAL: Final = 0x40
CLOCK_EVENT_HW_POWER_BRAKE: Final = 0x80
CLOCK_EVENT_DISPLAY_CLOCKS: Final = 0x100

CLOCK_EVENT_NAMES: Final[dict[int, str]] = {
    CLOCK_EVENT_GPU_IDLE: "gpu_idle",
    CLOCK_EVENT_APP_CLOCKS: "applications_clocks_setting",
    CLOCK_EVENT_SW_POWER_CAP: "sw_power_cap",
    CLOCK_EVENT_HW_SLOWDOWN: "hw_slowdown",
    CLOCK_EVENT_SYNC_BOOST: "sync_boost",
    CLOCK_EVENT_SW_THERMAL: "sw_thermal_slowdown",
    CLOCK_EVENT_HW_THERMAL: "hw_thermal_slowdown",
    CLOCK_EVENT_HW_POWER_BRAKE: "hw_power_brake_slowdown",
    CLOCK_EVENT_DISPLAY_CLOCKS: "display_clock_setting",
}
"""Bit -> the name used in metric labels and health reasons."""

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION values (newer drivers).
RECOVERY_NONE: Final = 0
RECOVERY_GPU_RESET: Final = 1
RECOVERY_NODE_REBOOT: Final = 2
RECOVERY_DRAIN_P2P: Final = 3
RECOVERY_DRAIN_AND_RESET: Final = 4
RECOVERY_RECOVER_IMEX_DOMAIN: Final = 5
RECOVERY_BUS_RESET: Final = 6
RECOVERY_SYSTEM_REBOOT: Final = 7

MIB: Final = 1024 * 1024


class NvmlError(Exception):
    """An NVML call failed; ``code`` is NVML's return code when there is one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NvmlInitError(NvmlError):
    """NVML could not be initialised (no driver, library missing, driver/library mismatch)."""


class GpuLostError(NvmlError):
    """The GPU fell off the bus (NVML_ERROR_GPU_IS_LOST, code 15)."""


class GpuResetRequiredError(NvmlError):
    """NVML answers only after a GPU reset (NVML_ERROR_RESET_REQUIRED, code 16)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """What a GPU says it is. Read once after init; a changed UUID means another GPU."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int
    pci_bus_id: str | None = None
    compute_capability: str | None = None
    """``major.minor``, as ``9.0``."""


@dataclass(frozen=True)
class RemappedRows:
    """Memory row remapping (A100 and later): corrected and uncorrected counts, flags."""

    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


@dataclass(frozen=True)
class EccCounts:
    """Total ECC errors; volatile counts reset with the GPU, aggregate ones never."""

    volatile_correctable: int | None = None
    volatile_uncorrectable: int | None = None
    aggregate_correctable: int | None = None
    aggregate_uncorrectable: int | None = None


@dataclass(frozen=True)
class DeviceSample:
    """One batched reading of a GPU. A field NVML does not support on this GPU is None."""

    index: int
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    gpu_utilization_pct: int | None = None
    memory_utilization_pct: int | None = None
    memory_used_mib: int | None = None
    ecc: EccCounts = EccCounts()
    remapped_rows: RemappedRows | None = None
    clock_event_reasons: int | None = None
    """Bit mask of CLOCK_EVENT_* reasons the clocks are held down for."""
    recovery_action: int | None = None
    """NVML_FI_DEV_GET_GPU_RECOVERY_ACTION where the driver has it, else None."""
    errors: tuple[str, ...] = ()
    """Calls that failed for other reasons than "not supported"; the rest is still valid."""


@dataclass(frozen=True)
class XidEvent:
    """One critical XID error reported by the driver."""

    index: int
    xid: int
    at: float
    """Monotonic time the agent received it."""


class NvmlBackend(Protocol):
    """The part of NVML the agent uses. Implementations raise only :class:`NvmlError`s.

    Calls may come from two threads (the sweep and the XID waiter); implementations must
    be safe for that, as NVML itself is.
    """

    def init(self) -> None:
        """Initialise the library; raises NvmlInitError. Calling it again re-initialises."""
        ...

    def shutdown(self) -> None:
        """Release the library; never raises."""
        ...

    def device_count(self) -> int: ...

    def driver_version(self) -> str: ...

    def cuda_version(self) -> str:
        """The CUDA driver API version, as ``12.4``."""
        ...

    def identity(self, index: int) -> DeviceIdentity:
        """Raises GpuLostError when the GPU is gone."""
        ...

    def sample(self, index: int) -> DeviceSample:
        """Everything polled per sweep in as few calls as the library allows.

        Raises GpuLostError or GpuResetRequiredError for the whole device; other failures
        of single fields leave them None and are listed in ``errors``.
        """
        ...

    def watch_xids(self) -> None:
        """Register for critical XID events on every GPU that supports them."""
        ...

    def wait_xid(self, timeout_s: float) -> XidEvent | None:
        """The next XID event, or None when ``timeout_s`` passes without one."""
        ...
