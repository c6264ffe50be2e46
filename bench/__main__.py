"""Run every benchmark, then a summary of the targets: `.venv/bin/python -m bench [NAME ...]`.

Exits 1 only when a benchmark could not run; a missed target is reported, not an error.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from bench import (
    chunked,
    commands,
    discovery_lag,
    latency,
    load,
    overtake,
    shaping,
    signing,
    startup,
    storm,
    throughput,
)
from bench._common import BenchError, Row, Table, machine

_BENCHES = {
    module.__name__.rsplit(".", 1)[-1]: module
    for module in (
        throughput,
        load,
        latency,
        storm,
        commands,
        overtake,
        chunked,
        startup,
        discovery_lag,
        shaping,
        signing,
    )
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
        module = _BENCHES[name]
        started = time.perf_counter()
        try:
            table: Table = module.measure(module.Options())
        except BenchError as exc:
            print(f"\n{name} could not run: {exc}", file=sys.stderr)
            failed.append(name)
            summary.append(Row(f"{name}: could not run", "", met=False))
            continue
        table.print()
        summary += [
            dataclasses.replace(r, metric=f"{name}: {r.metric.strip()}")
            for r in table.rows
            if r.met is not None
        ]
        print(f"  ({name} took {time.perf_counter() - started:.0f} s)")
    met = sum(1 for r in summary if r.met)
    notes = [f"{k}: {v}" for k, v in host.items()]
    Table(f"summary: {met} of {len(summary)} targets met", summary, notes).print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
