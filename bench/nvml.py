"""The agent on a real GPU: one GPU's sample, a whole sweep, and the running process.

Needs an NVIDIA GPU (``make bench`` elsewhere keeps the section measured on one). Ours is
the agent's own code on real NVML. Baselines, measured in the same run on the same GPUs:

- one GPU's sample: the same readings through NVML's classic one-value getters (ECC
  counters and row remapping one call each), which is what our batched
  ``nvmlDeviceGetFieldValues`` replaces;
- the sweep: ``nvidia-smi --query-gpu`` for the same readings, the way shell-script
  exporters collect them;
- the process (scrape latency, CPU, RSS): bench/agent.py's naive exporter, which reads
  NVML on every scrape, on the same GPUs.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from typing import Any

from bench.agent import process_rows, watch_process
from bench.harness import Report, Row, UnavailableHereError, sample
from gpumesh.clock import SystemClock
from gpumesh.node_agent.collector import Collector
from gpumesh.node_agent.nvml.real import NVML_TEMPERATURE_GPU, PynvmlBackend
from gpumesh.node_agent.nvml.types import NvmlError

COMMAND = "python -m bench nvml  (on a machine with an NVIDIA GPU; make test-gpu checks it)"
SWEEP_TARGET_S = 0.050
PROCESS_WINDOW_S = 30.0
PROCESS_SCRAPES = 500
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
    report.rows += _processes()
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
        "Process rows: the agent as shipped (real NVML, metrics only, --dcgm-names, 1 s "
        "interval) against bench/agent.py's naive exporter on the same GPUs (NVML read on "
        f"every scrape), each a subprocess watched for {PROCESS_WINDOW_S:.0f} s while "
        f"scraped every second, then {PROCESS_SCRAPES} keep-alive scrapes; CPU in "
        "millicores and RSS in MiB in the ms columns, as in bench/agent.py.",
    ]
    return report


def _processes() -> list[Row]:
    """The agent and the naive exporter as processes on the real GPUs."""
    argv = [sys.executable, "-m", "gpumesh.node_agent", "run", "--node", "bench-gpu"]
    argv += ["--interval", "1", "--dcgm-names", "--metrics-host", "127.0.0.1"]
    ours = watch_process(
        argv, "--metrics-port", settle_s=3, window_s=PROCESS_WINDOW_S, scrapes=PROCESS_SCRAPES
    )
    naive = watch_process(
        [sys.executable, "-m", "bench.agent", "naive", "--real-nvml"],
        "--port",
        settle_s=3,
        window_s=PROCESS_WINDOW_S,
        scrapes=PROCESS_SCRAPES,
    )
    return process_rows(
        ours, naive, "/metrics over HTTP keep-alive vs naive exporter (NVML per scrape)", "naive"
    )
