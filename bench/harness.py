"""What every benchmark shares: timing, percentiles, ratios, and the report format.

Machines are noisy, so a benchmark reports its figures next to a baseline measured in the
same run, and the ratio between them, rather than absolute numbers alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines


class UnavailableHereError(Exception):
    """A benchmark that cannot run on this machine (no GPU, say); its section is kept."""


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
    ratio: float | None = None
    """The ratio shown, when it is not ours p50 over baseline p50 (paired rounds)."""

    def cells(self) -> list[str]:
        value = self.ratio
        if value is None and self.baseline:
            value = self.ours.p50 / self.baseline.p50
        ratio = "-" if value is None else f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"
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


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """Terminate a child the benchmark started; kill it if it outlives ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def consume(response: Any) -> bytes:
    """The body of a response fetched with ``_preload_content=False``; its connection goes
    back to the pool."""
    body = bytes(response.data)
    response.release_conn()
    return body


def raw_json(response: Any) -> Any:
    """A response parsed without the client's model classes (deserialising 1,000 Nodes
    into them takes seconds of CPU)."""
    return json.loads(consume(response))


def wait_until(what: str, done: Callable[[], bool], timeout: float, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class ListWatch:
    """List, then watch from that version in a thread; ``observe`` sees every object as
    it is added or changes, with the ``time.monotonic()`` it arrived at.

    ``list_fn`` is a client list call (``list_namespaced_pod``, a bound
    ``list_namespaced_custom_object``...) taking ``args`` and keyword options. A gone
    version or an error event lists again; a dropped stream resumes from the last one.
    """

    def __init__(self, list_fn: Callable[..., Any], *args: Any, name: str, **options: Any) -> None:
        self.list_fn, self.args, self.options = list_fn, args, options
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)
        self._rv = ""
        self._response: Any = None

    def observe(self, obj: Mapping[str, Any], now: float) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._rv = self._list()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._response.close()
        self._thread.join(timeout=30)

    def _observed(self, obj: Mapping[str, Any], now: float) -> None:
        with self._cond:
            self.observe(obj, now)
            self._cond.notify_all()

    def _list(self) -> str:
        listed = raw_json(self.list_fn(*self.args, _preload_content=False, **self.options))
        now = time.monotonic()
        for obj in listed["items"]:
            self._observed(obj, now)
        return str(listed["metadata"]["resourceVersion"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._response = self.list_fn(
                    *self.args,
                    watch=True,
                    resource_version=self._rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=5,  # how long stopping may take
                    _preload_content=False,
                    **self.options,
                )
                for line in iter_resp_lines(self._response):  # type: ignore[no-untyped-call]
                    now = time.monotonic()
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        self._rv = self._list()
                        break
                    self._rv = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._observed(obj, now)
                    if self._stop.is_set():
                        break
            except ApiException as err:
                if err.status == 410:
                    self._rv = self._list()
                elif not self._stop.is_set():
                    time.sleep(0.2)
            except Exception:  # a closed or dropped stream: resume unless stopping
                if not self._stop.is_set():
                    time.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    self._response.release_conn()
