"""`python -m bench [NAME ...]`: run benchmark modules in bench/ and update docs/BENCHMARKS.md.

A benchmark module is any ``bench/*.py`` with a ``run() -> Report`` function; one that
raises ``UnavailableHereError`` (it needs hardware this machine lacks) keeps its section.
With names, only those run and only their sections of BENCHMARKS.md are replaced; the
sections of the others are kept as they were measured (each says when).
"""

from __future__ import annotations

import importlib
import platform
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import UnavailableHereError

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "BENCHMARKS.md"
SKIP = {"__init__", "__main__", "harness"}
SECTION = re.compile(r"<!-- bench:(?P<name>[a-z_]+) -->\n(?P<body>.*?)<!-- /bench -->\n", re.S)


def discover(only: list[str]) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP)
    unknown = set(only) - set(names)
    if unknown:
        raise SystemExit(f"no benchmark named {', '.join(sorted(unknown))}; have {names}")
    return [n for n in names if not only or n in only]


def existing_sections() -> dict[str, str]:
    try:
        text = OUT.read_text()
    except FileNotFoundError:
        return {}
    return {m["name"]: m["body"] for m in SECTION.finditer(text)}


def main(argv: list[str]) -> int:
    names = discover(argv)
    sections = existing_sections()
    machine = (
        f"{platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== bench/{name}.py", flush=True)
        started = time.perf_counter()
        try:
            report = module.run()
        except UnavailableHereError as why:
            kept = "kept the section measured earlier" if name in sections else "no section"
            print(f"   not run here: {why}; {kept}", flush=True)
            continue
        took = time.perf_counter() - started
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = report.markdown() + f"\n_Measured {stamp} on {machine}; took {took:.0f} s._\n"
        print(body, flush=True)
        sections[name] = body
    header = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench [NAME ...]`); do not edit by hand.",
        "Latencies are p50 / p95 / p99 in milliseconds; ratios compare with a baseline "
        "measured in the same run, since machines are noisy.",
        "",
    ]
    if not sections:
        header.append("No benchmark modules are present yet.")
    body = "".join(
        f"<!-- bench:{name} -->\n{sections[name]}<!-- /bench -->\n" for name in sorted(sections)
    )
    OUT.write_text("\n".join(header) + "\n" + body)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
