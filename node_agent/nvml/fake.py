"""A fake NVML: scriptable GPUs (model, memory, temperature, power and load curves) and
timed faults, behind the same :class:`NvmlBackend` protocol as the real library.

Faults are plain dicts as written in the fleet file of ``python -m testbed up``::

    {atSeconds: 120, gpuIndex: 3, kind: xid, xidCode: 79, durationSeconds: 30}

``gpu``/``xid`` are accepted for ``gpuIndex``/``xidCode``. ``durationSeconds`` (optional,
default: until the agent restarts) ends the fault; the fake then behaves as if the GPU was
reset: it answers again, volatile ECC counts go back to zero, the pending row remap is
applied and the recovery action returns to none. Kinds: ``xid``, ``ecc_dbe`` (double-bit
ECC error, with XID 48), ``row_remap_pending`` (with XID 63), ``thermal`` (hot and
throttled), ``gpu_lost`` (off the bus) and ``nvml_init_failure`` (every call fails).
Times count from the fake's creation on its clock; with a :class:`ManualClock` a test
walks through them instantly.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

import yaml

from gpumesh.clock import Clock, SystemClock
from gpumesh.node_agent.nvml.types import (
    CLOCK_EVENT_GPU_IDLE,
    CLOCK_EVENT_HW_SLOWDOWN,
    CLOCK_EVENT_HW_THERMAL,
    CLOCK_EVENT_SW_THERMAL,
    RECOVERY_GPU_RESET,
    RECOVERY_NONE,
    DeviceIdentity,
    DeviceSample,
    EccCounts,
    GpuLostError,
    NvmlError,
    NvmlInitError,
    RemappedRows,
    XidEvent,
)

Curve = Callable[[float], float]
"""Seconds since the fake started -> a value."""

FaultKind = Literal[
    "xid", "ecc_dbe", "row_remap_pending", "thermal", "gpu_lost", "nvml_init_failure"
]
FAULT_KINDS: Final = frozenset(get_args(FaultKind))

# XIDs after which a driver with the recovery-action field asks for a GPU reset. This is
# the fake *driver's* behaviour; the agent's own XID policy lives in health.py.
_DRIVER_RESET_XIDS: Final = frozenset({48, 63, 64, 74, 79, 92, 95, 119, 120, 140, 143})
_NAMESPACE: Final = uuid.UUID("6f0c2a52-7f0e-4d1c-9a55-5c1d2b0e4a10")
NVML_ERROR_DRIVER_NOT_LOADED: Final = 9

# Board power limits by product-name fragment, watts; the first match wins.
_POWER_LIMITS: Final = (
    ("H200", 700.0),
    ("H100 PCIe", 350.0),
    ("H100", 700.0),
    ("A100-PCIE", 250.0),
    ("A100", 400.0),
    ("L40", 300.0),
    ("4090", 450.0),
    ("3090", 350.0),
)
THERMAL_TEMPERATURE_C: Final = 93


class Cheat(StrEnum):
    """How a fake node's agent lies in its proof of GPU (a fleet node's ``cheat``; the
    lies themselves are in node_agent/cheats.py)."""

    WRONG_ANSWER = "WrongAnswer"
    """Commits to a product it did not compute (every entry off by one)."""
    TOO_SLOW = "TooSlow"
    """Computes honestly but answers after the deadline, as a slower GPU would."""
    REPLAY = "Replay"
    """Answers with another node's proof, word for word."""
    SMALL_VRAM = "SmallVram"
    """Computes only the half of each product that fits its memory; guesses zeros for the rest."""
    SELF_GRADED = "SelfGraded"
    """Answers nothing and writes a Passed verdict for itself."""


def power_limit_for(model: str) -> float:
    """A plausible enforced power limit for a product name."""
    return next((watts for frag, watts in _POWER_LIMITS if frag in model), 300.0)


@dataclass(frozen=True)
class Fault:
    """A fault that starts ``at_s`` seconds after the fake starts."""

    at_s: float
    gpu: int
    kind: FaultKind
    xid: int | None = None
    duration_s: float | None = None
    """None: lasts until the fake is recreated (the agent restarts)."""

    def active(self, t: float) -> bool:
        return self.at_s <= t and (self.duration_s is None or t < self.at_s + self.duration_s)

    def emitted_xid(self) -> int | None:
        """The XID the driver reports when this fault starts."""
        if self.kind == "xid":
            return self.xid
        return {"ecc_dbe": 48, "row_remap_pending": 63}.get(self.kind)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Fault:
        """Read a fleet-file fault; errors name the key a user must fix."""

        def pick(*keys: str) -> Any:
            return next((raw[k] for k in keys if k in raw), None)

        kind = pick("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r} is not one of {', '.join(sorted(FAULT_KINDS))}")
        at = pick("atSeconds", "at_seconds", "at")
        if not isinstance(at, int | float) or at < 0:
            raise ValueError(f"fault atSeconds must be a number >= 0, not {at!r}")
        gpu = pick("gpuIndex", "gpu_index", "gpu")
        if gpu is None:
            gpu = 0
        if not isinstance(gpu, int) or gpu < 0:
            raise ValueError(f"fault gpuIndex must be an integer >= 0, not {gpu!r}")
        xid = pick("xidCode", "xid_code", "xid")
        if kind == "xid" and not isinstance(xid, int):
            raise ValueError("a fault of kind xid needs an integer xidCode")
        duration = pick("durationSeconds", "duration_seconds", "duration")
        if duration is not None and (not isinstance(duration, int | float) or duration <= 0):
            raise ValueError(f"fault durationSeconds must be a number > 0, not {duration!r}")
        return cls(
            at_s=float(at),
            gpu=gpu,
            kind=cast(FaultKind, kind),
            xid=xid if kind == "xid" else None,
            duration_s=None if duration is None else float(duration),
        )


def _default_utilization(index: int) -> Curve:
    # A slow, per-GPU-shifted load wave: enough movement to see in dashboards.
    return lambda t: 50.0 + 45.0 * math.sin(2 * math.pi * t / 300.0 + index)


@dataclass
class FakeGpu:
    """One scripted GPU. Curves take seconds since start; None picks a plausible default."""

    model: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    compute_capability: str = "9.0"
    uuid: str | None = None
    pci_bus_id: str | None = None
    power_limit_w: float | None = None
    idle_power_w: float = 60.0
    utilization: Curve | None = None
    temperature: Curve | None = None
    power: Curve | None = None


@dataclass
class _GpuState:
    identity: DeviceIdentity
    spec: FakeGpu
    utilization: Curve
    temperature: Curve
    power: Curve
    power_limit_w: float


@dataclass(frozen=True)
class FleetNodeScript:
    """A fleet-file node as the fake needs it, with its supplier's offer."""

    name: str
    supplier: str | None
    region: str | None
    price_per_gpu_hour: str | None
    gpus: tuple[FakeGpu, ...]
    faults: tuple[Fault, ...]
    cheat: Cheat | None = None


class FakeNvml:
    """The fake library. Thread-safe like NVML; every call follows the script at "now"."""

    def __init__(
        self,
        gpus: Sequence[FakeGpu],
        faults: Iterable[Fault | Mapping[str, Any]] = (),
        *,
        clock: Clock | None = None,
        node_name: str = "fake-node",
        driver_version: str = "550.90.07",
        cuda_version: str = "12.4",
        cheat: Cheat | None = None,
        call_latency_s: float = 0.0,
    ) -> None:
        self._clock = clock or SystemClock()
        self._start = self._clock.monotonic()
        self._lock = threading.Lock()
        self._driver = driver_version
        self._cuda = cuda_version
        self.is_fake = True
        """The agent proves these GPUs with NumPy (no GPU to run CuPy on)."""
        self.cheat = cheat
        """How the agent lies in its proof of GPU, if it does (see cheats.py)."""
        self.call_latency_s = call_latency_s
        """Emulated cost of one device sample, to compare collectors under real latency."""
        self._initialised = False
        self._watching = False
        self._gpus = [self._state(i, g, node_name) for i, g in enumerate(gpus)]
        self._faults: list[Fault] = []
        self._xid_queue: list[tuple[float, Fault]] = []
        self.init_calls = 0
        for f in faults:
            self.add_fault(f)

    # --- scripting ---------------------------------------------------------------------

    @staticmethod
    def _state(index: int, spec: FakeGpu, node: str) -> _GpuState:
        ident = DeviceIdentity(
            index=index,
            uuid=spec.uuid or f"GPU-{uuid.uuid5(_NAMESPACE, f'{node}/{index}')}",
            name=spec.model,
            memory_total_mib=spec.memory_mib,
            pci_bus_id=spec.pci_bus_id or f"00000000:{0x18 + 0x10 * index:02X}:00.0",
            compute_capability=spec.compute_capability,
        )
        limit = spec.power_limit_w or power_limit_for(spec.model)
        util = spec.utilization or _default_utilization(index)
        temp = spec.temperature or (lambda t: 33.0 + 0.42 * util(t))
        power = spec.power or (
            lambda t: spec.idle_power_w + (limit - spec.idle_power_w) * util(t) / 100
        )
        return _GpuState(ident, spec, util, temp, power, limit)

    def add_fault(self, fault: Fault | Mapping[str, Any]) -> Fault:
        """Schedule a fault (relative to the fake's start); returns it parsed."""
        f = fault if isinstance(fault, Fault) else Fault.from_dict(fault)
        if f.kind != "nvml_init_failure" and f.gpu >= len(self._gpus):
            raise ValueError(f"fault targets GPU {f.gpu} but the fake has {len(self._gpus)}")
        with self._lock:
            self._faults.append(f)
            if f.emitted_xid() is not None:
                self._xid_queue.append((f.at_s, f))
                self._xid_queue.sort(key=lambda item: item[0])
        return f

    def elapsed(self) -> float:
        """Seconds since the fake started, on its clock."""
        return self._clock.monotonic() - self._start

    def _active(self, t: float, gpu: int | None = None) -> list[Fault]:
        with self._lock:
            faults = list(self._faults)
        return [f for f in faults if f.active(t) and (gpu is None or f.gpu == gpu)]

    def _started(self, t: float, gpu: int, kind: FaultKind) -> int:
        with self._lock:
            return sum(1 for f in self._faults if f.gpu == gpu and f.kind == kind and f.at_s <= t)

    def _check_library(self, t: float) -> None:
        if any(f.kind == "nvml_init_failure" for f in self._active(t)):
            self._initialised = False
            raise NvmlError("Driver Not Loaded (scripted)", NVML_ERROR_DRIVER_NOT_LOADED)
        if not self._initialised:
            raise NvmlError("Uninitialized", 1)

    def _check_device(self, t: float, index: int) -> list[Fault]:
        self._check_library(t)
        if not 0 <= index < len(self._gpus):
            raise NvmlError(f"Invalid Argument: no GPU {index}", 2)
        active = self._active(t, index)
        if any(f.kind == "gpu_lost" or (f.kind == "xid" and f.xid == 79) for f in active):
            raise GpuLostError("GPU is lost (scripted)", 15)
        return active

    # --- NvmlBackend ---------------------------------------------------------------------

    def init(self) -> None:
        self.init_calls += 1
        if any(f.kind == "nvml_init_failure" for f in self._active(self.elapsed())):
            raise NvmlInitError("Driver Not Loaded (scripted)", NVML_ERROR_DRIVER_NOT_LOADED)
        self._initialised = True

    def shutdown(self) -> None:
        self._initialised = False
        self._watching = False

    def device_count(self) -> int:
        self._check_library(self.elapsed())
        return len(self._gpus)

    def driver_version(self) -> str:
        self._check_library(self.elapsed())
        return self._driver

    def cuda_version(self) -> str:
        self._check_library(self.elapsed())
        return self._cuda

    def identity(self, index: int) -> DeviceIdentity:
        self._check_device(self.elapsed(), index)
        return self._gpus[index].identity

    def sample(self, index: int) -> DeviceSample:
        t = self.elapsed()
        active = self._check_device(t, index)
        if self.call_latency_s:
            SystemClock().sleep(self.call_latency_s)
        gpu = self._gpus[index]
        util = max(0.0, min(100.0, gpu.utilization(t)))
        temperature = gpu.temperature(t)
        power = gpu.power(t)
        reasons = CLOCK_EVENT_GPU_IDLE if util < 1 else 0
        kinds = {f.kind for f in active}
        if "thermal" in kinds:
            temperature = max(temperature, THERMAL_TEMPERATURE_C + util / 50)
            reasons |= CLOCK_EVENT_SW_THERMAL | CLOCK_EVENT_HW_THERMAL | CLOCK_EVENT_HW_SLOWDOWN
            power *= 0.7
        dbe_volatile = sum(1 for f in active if f.kind == "ecc_dbe")
        dbe_total = self._started(t, index, "ecc_dbe")
        remaps = self._started(t, index, "row_remap_pending")
        reset_wanted = any(
            f.kind in ("ecc_dbe", "row_remap_pending")
            or (f.kind == "xid" and f.xid in _DRIVER_RESET_XIDS)
            for f in active
        )
        return DeviceSample(
            index=index,
            temperature_c=round(temperature),
            power_w=round(min(power, gpu.power_limit_w), 1),
            power_limit_w=gpu.power_limit_w,
            gpu_utilization_pct=round(util),
            memory_utilization_pct=round(util * 0.6),
            memory_used_mib=round(gpu.identity.memory_total_mib * util / 125),
            ecc=EccCounts(
                volatile_correctable=0,
                volatile_uncorrectable=dbe_volatile,
                aggregate_correctable=0,
                aggregate_uncorrectable=dbe_total,
            ),
            remapped_rows=RemappedRows(
                correctable=0,
                uncorrectable=remaps,
                pending="row_remap_pending" in kinds,
                failure=False,
            ),
            clock_event_reasons=reasons,
            recovery_action=RECOVERY_GPU_RESET if reset_wanted else RECOVERY_NONE,
        )

    def watch_xids(self) -> None:
        self._check_library(self.elapsed())
        self._watching = True

    def wait_xid(self, timeout_s: float) -> XidEvent | None:
        deadline = self._clock.monotonic() + max(0.0, timeout_s)
        while True:
            t = self.elapsed()
            self._check_library(t)
            with self._lock:
                due = self._xid_queue[0] if self._xid_queue else None
                if due is not None and due[0] <= t:
                    self._xid_queue.pop(0)
            if due is not None and due[0] <= t:
                xid = due[1].emitted_xid()
                assert xid is not None
                return XidEvent(index=due[1].gpu, xid=xid, at=self._clock.monotonic())
            now = self._clock.monotonic()
            if now >= deadline:
                return None
            until = deadline if due is None else min(deadline, self._start + due[0])
            # Short naps so faults added meanwhile are seen; a manual clock jumps instead.
            self._clock.sleep(min(max(until - now, 0.0), 0.25))


# --- fleet files ---------------------------------------------------------------------------


def _gpus_from_node(node: Mapping[str, Any]) -> tuple[FakeGpu, ...]:
    count = int(node.get("gpuCount", 0))
    if count == 0:
        return ()
    model = node.get("gpuModel")
    memory = node.get("gpuMemoryMiB")
    if not isinstance(model, str) or not isinstance(memory, int):
        raise ValueError(f"node {node.get('name')}: gpuModel and gpuMemoryMiB are required")
    cc = str(node.get("computeCapability", "")) or None
    return tuple(
        FakeGpu(model=model, memory_mib=memory, compute_capability=cc or "0.0")
        for _ in range(count)
    )


def fleet_node(data: Mapping[str, Any], node_name: str) -> FleetNodeScript:
    """The named node of a parsed fleet document; KeyError lists the nodes there are."""
    names: list[str] = []
    for supplier in data.get("suppliers", []) or []:
        for node in supplier.get("nodes", []) or []:
            names.append(str(node.get("name")))
            if node.get("name") != node_name:
                continue
            price = supplier.get("pricePerGpuHour")
            return FleetNodeScript(
                name=node_name,
                supplier=supplier.get("name"),
                region=supplier.get("region"),
                price_per_gpu_hour=None if price is None else str(price),
                gpus=_gpus_from_node(node),
                faults=tuple(Fault.from_dict(f) for f in node.get("faults", []) or []),
                cheat=Cheat(node["cheat"]) if node.get("cheat") else None,
            )
    raise KeyError(f"node {node_name!r} is not in the fleet file (it has: {', '.join(names)})")


def load_fleet_node(path: Path | str, node_name: str) -> FleetNodeScript:
    """Read a fleet YAML file and return one node's script."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a fleet file is a mapping with 'suppliers'")
    return fleet_node(data, node_name)


def fake_from_fleet(
    script: FleetNodeScript,
    *,
    clock: Clock | None = None,
) -> FakeNvml:
    """A fake NVML playing one fleet node, faults included."""
    return FakeNvml(
        script.gpus,
        script.faults,
        clock=clock,
        node_name=script.name,
        cheat=script.cheat,
    )


__all__ = [
    "FAULT_KINDS",
    "Curve",
    "FakeGpu",
    "FakeNvml",
    "Fault",
    "FaultKind",
    "FleetNodeScript",
    "fake_from_fleet",
    "fleet_node",
    "load_fleet_node",
    "power_limit_for",
]
