"""The agent's NVML reads on a real GPU: one GPU's sample and a whole sweep.

Needs an NVIDIA GPU (``make bench`` elsewhere keeps the section measured on one). Ours is
the agent's own code on real NVML. Baselines, measured in the same run on the same GPUs:

- one GPU's sample: the same readings through NVML's classic one-value getters (ECC
  counters and row remapping one call each), which is what our batched
  ``nvmlDeviceGetFieldValues`` replaces;
- the sweep: ``nvidia-smi --query-gpu`` for the same readings, the way shell-script
  exporters collect them.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from typing import Any

from bench.harness import Report, Row, UnavailableHereError, sample
from gpumesh.node_agent.clock import SystemClock
from gpumesh.node_agent.collector import Collector
from gpumesh.node_agent.nvml.real import NVML_TEMPERATURE_GPU, PynvmlBackend
from gpumesh.node_agent.nvml.types import NvmlError

COMMAND = "python -m bench nvml  (on a machine with an NVIDIA GPU; make test-gpu checks it)"
SWEEP_TARGET_S = 0.050
SMI_QUERY = (
    "index,uuid,temperature.gpu,power.draw,power.limit,utilization.gpu,utilization.memory,"
    "memory.used,clocks_event_reasons.active,ecc.errors.corrected.volatile.total,"
    "ecc.errors.uncorrected.volatile.total,ecc.errors.corrected.aggregate.total,"
    "ecc.errors.uncorrected.aggregate.total,remapped_rows.correctable,"
    "remapped_rows.uncorrectable,remapped_rows.pending,remapped_rows.failure"
)


def classic_sample(nvml: Any, handle: Any) -> list[Any]:
    """Our sample's readings with one getter per value (the pre-field-values way)."""
    out: list[Any] = [
        nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU),
        nvml.nvmlDeviceGetPowerUsage(handle),
        nvml.nvmlDeviceGetEnforcedPowerLimit(handle),
        nvml.nvmlDeviceGetUtilizationRates(handle),
        nvml.nvmlDeviceGetMemoryInfo(handle),
        nvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
    ]
    for kind in (0, 1):
        for counter in (0, 1):
            out.append(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, counter))
    out.append(nvml.nvmlDeviceGetRemappedRows(handle))
    return out


def run() -> Report:
    backend = PynvmlBackend()
    try:
        backend.init()
    except NvmlError as err:
        raise UnavailableHereError(f"no NVIDIA GPU here ({err})") from None
    try:
        return _measure(backend)
    finally:
        backend.shutdown()


def _measure(backend: PynvmlBackend) -> Report:
    import pynvml

    count = backend.device_count()
    name = backend.identity(0).name
    report = Report(f"Agent on real NVML ({count}x {name})", COMMAND)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    ours = sample(lambda: backend.sample(0), repeat=500, warmup=20)
    classic = sample(lambda: classic_sample(pynvml, handle), repeat=500, warmup=20)
    report.rows.append(Row("one GPU's sample vs classic getters", ours, classic))

    collector = Collector(PynvmlBackend(), "bench-gpu", SystemClock())
    sweep = sample(collector.sweep, repeat=300, warmup=5)
    smi_path = shutil.which("nvidia-smi")
    smi = None
    if smi_path is not None:
        argv = [smi_path, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader"]
        smi = sample(lambda: subprocess.run(argv, capture_output=True, check=True), repeat=30)
    report.rows.append(
        Row(
            f"sweep of {count} GPU(s) (collector + health) vs nvidia-smi query",
            sweep,
            smi,
            target=f"<= {SWEEP_TARGET_S * 1e3:.0f} ms",
            met=sweep.p99 <= SWEEP_TARGET_S,
        )
    )
    report.notes += [
        f"Driver {backend.driver_version()}, CUDA {backend.cuda_version()}, "
        f"nvidia-ml-py {importlib.metadata.version('nvidia-ml-py')}.",
        "Both rows read the same values; the sample row on GPU 0 only. Ours builds the typed "
        "sample and maps errors; the classic baseline returns the raw answers and cannot "
        "read the recovery action (a field value only). The sweep includes the health "
        "evaluation and the snapshot the reporter and /metrics use.",
        "nvidia-smi is a fresh process per query (it initialises NVML each time), which is "
        "how shell-script exporters run it."
        if smi
        else "nvidia-smi is not on PATH here.",
        "Scrapes of /metrics never call NVML (they serve the last sweep), so NVML's speed "
        "bounds the sweep only; see bench/agent.py for scrape latency.",
    ]
    return report
