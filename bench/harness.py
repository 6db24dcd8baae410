"""What every benchmark shares: timing, percentiles, ratios, and the report format.

Machines are noisy, so a benchmark reports its figures next to a baseline measured in the
same run, and the ratio between them, rather than absolute numbers alone.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config


@dataclass(frozen=True)
class Stats:
    """Latency samples in seconds, summarised."""

    samples: tuple[float, ...]

    def percentile(self, p: float) -> float:
        ordered = sorted(self.samples)
        index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        return ordered[index]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)


def sample(fn: Callable[[], object], repeat: int, warmup: int = 3) -> Stats:
    """Time ``fn`` ``repeat`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Stats(tuple(times))


@dataclass(frozen=True)
class Row:
    """One measured figure, its target if any, and the baseline it is compared with."""

    metric: str
    ours: Stats
    baseline: Stats | None = None
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        ratio = f"{self.ours.p50 / self.baseline.p50:.2f}x" if self.baseline else "-"
        base = _ms(self.baseline) if self.baseline else "-"
        verdict = {True: "met", False: "MISSED", None: "-"}[self.met]
        return [self.metric, _ms(self.ours), base, ratio, self.target or "-", verdict]


def _ms(stats: Stats) -> str:
    return f"{stats.p50 * 1e3:.3f} / {stats.p95 * 1e3:.3f} / {stats.p99 * 1e3:.3f}"


@dataclass
class Report:
    """A benchmark's output: a title, a table of rows, and notes on method."""

    title: str
    command: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        head = ["metric", "ours p50/p95/p99 ms", "baseline p50/p95/p99 ms", "ratio", "target", ""]
        lines = [f"## {self.title}", "", f"Reproduce: `{self.command}`", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# --- helpers for the benchmarks that run a control plane ----------------------------------


def api_client(kubeconfig: Path) -> client.ApiClient:
    """A client with a connection pool large enough for the benchmarks' creating threads."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = 32
    return client.ApiClient(cfg)


def untyped(value: object) -> Any:
    """The client's loosely typed answers (and bodies) as what they are: JSON objects."""
    return value


def parallel(fn: Callable[[Any], object], items: Iterable[Any], threads: int) -> None:
    """``fn`` over ``items`` from ``threads`` threads; the first failure is raised."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def load() -> str:
    """The load average, printed next to figures a busy machine would change."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f}"


def log(text: str) -> None:
    """Progress for the person waiting, stamped with the time and the load."""
    print(f"   [{time.strftime('%H:%M:%S')} load {load()}] {text}", file=sys.stderr, flush=True)
