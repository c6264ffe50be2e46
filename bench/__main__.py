"""Run every benchmark, then a summary of the targets: `.venv/bin/python -m bench [NAME ...]`.

Exits 1 only when a benchmark could not run; a missed target is reported, not an error.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from bench import latency, load, startup, storm, throughput
from bench._common import BenchError, Row, machine, print_table

if TYPE_CHECKING:
    from collections.abc import Callable

_BENCHES: dict[str, Callable[[], list[Row]]] = {
    "throughput": lambda: throughput.measure(throughput.Options()),
    "load": lambda: load.measure(load.Options()),
    "latency": lambda: latency.measure(latency.Options()),
    "storm": lambda: storm.measure(storm.Options()),
    "startup": lambda: startup.measure(startup.Options()),
}


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(_BENCHES)
    unknown = [n for n in names if n not in _BENCHES]
    if unknown:
        print(f"unknown benchmark {unknown}; choose from {list(_BENCHES)}", file=sys.stderr)
        return 2
    host = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in host.items()))
    summary: list[Row] = []
    failed: list[str] = []
    for name in names:
        started = time.perf_counter()
        try:
            rows = _BENCHES[name]()
        except BenchError as exc:
            print(f"\n{name} could not run: {exc}", file=sys.stderr)
            failed.append(name)
            summary.append(Row(f"{name}: could not run", "", met=False))
            continue
        summary += [
            Row(f"{name}: {r.metric.strip()}", r.measured, r.baseline, r.ratio, r.target, r.met)
            for r in rows
            if r.met is not None
        ]
        print(f"  ({name} took {time.perf_counter() - started:.0f} s)")
    met = sum(1 for r in summary if r.met)
    print_table(
        f"summary: {met} of {len(summary)} targets met",
        summary,
        [f"{k}: {v}" for k, v in host.items()],
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
