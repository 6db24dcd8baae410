"""`python -m bench`: run every benchmark module in bench/ and write docs/BENCHMARKS.md.

A benchmark module is any ``bench/*.py`` with a ``run() -> Report`` function.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

from bench.harness import Report

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "BENCHMARKS.md"
SKIP = {"__init__", "__main__", "harness"}


def discover(only: list[str]) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP)
    return [n for n in names if not only or n in only]


def main(argv: list[str]) -> int:
    names = discover(argv)
    reports: list[Report] = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== bench/{name}.py", flush=True)
        started = time.perf_counter()
        report: Report = module.run()
        print(report.markdown(), flush=True)
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
        reports.append(report)
    header = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand.",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}.",
        "Latencies are p50 / p95 / p99 in milliseconds; ratios compare with a baseline "
        "measured in the same run.",
        "",
    ]
    if not reports:
        header.append("No benchmark modules are present yet.")
    OUT.write_text("\n".join(header) + "\n" + "\n".join(r.markdown() for r in reports))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
