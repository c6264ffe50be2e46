"""What the audit log costs: commands/s and `accepted` latency with it on and off.

    .venv/bin/python -m bench.audit [--commands 400 --reps 3 --model-mb 20 --deploys 5]

Each rep runs two agents, one after the other: with `[security] audit = false` (the
baseline, first) and with the audit log on (the default). Each gets a burst of deletes of
streams that run nothing, all published at once (QoS 1; each answered without a restart:
two audit lines per command), then deploys with a fresh inline model of `--model-mb` MB as
MessagePack, one after the other (the agent hashes the whole payload for its audit line).
Rate = commands / (first publish -> the last command's `accepted`); latency = publish ->
`accepted`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Final

from bench._common import (
    BLOBS,
    YOLO,
    BenchError,
    Row,
    Table,
    bench_site,
    cli,
    median,
    mxids,
    percentile,
)
from bench.commands import _Sender

if TYPE_CHECKING:
    from pathlib import Path

    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_MB: Final = 1024 * 1024
_RATE_TARGET: Final = 0.9  # the audit log may cost at most 10 % of the command rate
_LATENCY_TARGET: Final = 1.1  # and at most 10 % more time to `accepted` for a large model


@dataclass(frozen=True, slots=True)
class Options:
    commands: int = 400
    reps: int = 3
    model_mb: int = 20
    deploys: int = 5


@dataclass(frozen=True, slots=True)
class Run:
    rate: float  # deletes accepted per second
    delete_cpu_us: float  # agent CPU per delete (all threads)
    accepted_ms: list[float]  # large deploys: publish -> accepted
    deploy_cpu_ms: float  # agent CPU per large deploy, its apply included
    audit_lines: int = 0
    audit_bytes: int = 0


def _audit_size(state: Path) -> tuple[int, int]:
    folder = state / "audit"
    if not folder.is_dir():
        return 0, 0
    files = list(folder.iterdir())
    lines = sum(p.read_bytes().count(b"\n") for p in files)
    return lines, sum(p.stat().st_size for p in files)


async def _large_deploys(
    watcher: Watcher, agent: Process, camera: str, options: Options
) -> list[float]:
    base = (BLOBS / "yolo_tiny.blob").read_bytes()
    times = []
    for rep in range(options.deploys):
        request_id = f"big-{rep}"
        model = base + os.urandom(options.model_mb * _MB - len(base))
        body: dict[str, object] = {"request_id": request_id, "nn_config": YOLO, "model": model}
        sent = await watcher.deploy(camera, "CAM_A", body, encoding="msgpack")
        accepted = await watcher.wait_for(
            partial(watcher.event, request_id, "accepted"), f"{request_id} accepted", 120
        )
        times.append((accepted[0] - sent) * 1000)
        await watcher.succeeded(request_id)
        agent.check()
    return times


def measure(options: Options) -> Table:
    cameras = mxids(1)
    idle = [f"IDLE{i:02d}" for i in range(2)]
    runs: dict[bool, list[Run]] = {False: [], True: []}
    with bench_site("audit") as site:
        for _ in range(options.reps):
            for audit in (False, True):
                config, topics = site.config(
                    cameras=[*cameras, *idle],
                    boot_seconds=0.2,
                    fps=2.0,
                    extra=["[security]", f"audit = {str(audit).lower()}"],
                )

                async def job(watcher: Watcher, agent: Process) -> Run:
                    sender = _Sender(watcher, cameras)
                    await sender.upload()
                    before = agent.cpu()
                    burst = await sender.burst(sender.deletes(options.commands, idle))
                    between = agent.cpu()
                    if not burst.answered_once:
                        raise BenchError("a command was not answered exactly once")
                    accepted = await _large_deploys(watcher, agent, cameras[0], options)
                    after = agent.cpu()
                    return Run(
                        rate=burst.rate,
                        delete_cpu_us=(between - before) / options.commands * 1e6,
                        accepted_ms=accepted,
                        deploy_cpu_ms=(after - between) / options.deploys * 1e3,
                    )

                started = time.perf_counter()
                run = site.run_agent(config, topics, job, cameras=[*cameras, *idle])
                lines, size = _audit_size(config.parent / "state")
                runs[audit].append(replace(run, audit_lines=lines, audit_bytes=size))
                print(
                    f"  audit {'on ' if audit else 'off'}: {run.rate:,.0f} commands/s "
                    f"({run.delete_cpu_us:.0f} µs CPU each), {options.model_mb} MB accepted "
                    f"p50 {percentile(run.accepted_ms, 50):.0f} ms "
                    f"({run.deploy_cpu_ms:.0f} ms CPU each); "
                    f"{time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                )
    return _table(options, runs)


def _table(options: Options, runs: dict[bool, list[Run]]) -> Table:
    on, off = runs[True], runs[False]
    rate, base = median([r.rate for r in on]), median([r.rate for r in off])
    latency_on = median([t for r in on for t in r.accepted_ms])
    latency_off = median([t for r in off for t in r.accepted_ms])
    rows = [
        Row(
            f"{options.commands} deletes needing no restart: commands/s",
            f"{rate:,.0f}",
            f"{base:,.0f} audit off",
            f"{rate / base:.2f}",
            f">= {_RATE_TARGET:g}x",
            rate / base >= _RATE_TARGET,
        ),
        Row(
            "  agent CPU per delete",
            f"{median([r.delete_cpu_us for r in on]):.0f} µs",
            f"{median([r.delete_cpu_us for r in off]):.0f} µs audit off",
            f"{median([r.delete_cpu_us for r in on]) / median([r.delete_cpu_us for r in off]):.2f}",
        ),
        Row(
            f"{options.model_mb} MB inline deploy (msgpack): accepted p50",
            f"{latency_on:.0f} ms",
            f"{latency_off:.0f} ms audit off",
            f"{latency_on / latency_off:.2f}",
            f"<= {_LATENCY_TARGET:g}x",
            latency_on / latency_off <= _LATENCY_TARGET,
        ),
        Row(
            "  agent CPU per deploy (apply included)",
            f"{median([r.deploy_cpu_ms for r in on]):.0f} ms",
            f"{median([r.deploy_cpu_ms for r in off]):.0f} ms audit off",
            f"{median([r.deploy_cpu_ms for r in on]) / median([r.deploy_cpu_ms for r in off]):.2f}",
        ),
        Row(
            "  audit lines written per agent (median)",
            f"{median([r.audit_lines for r in on]):.0f}",
            f"{median([r.audit_lines for r in off]):.0f} audit off",
        ),
        Row(
            "  audit bytes per line",
            f"{sum(r.audit_bytes for r in on) / max(1, sum(r.audit_lines for r in on)):.0f}",
        ),
    ]
    notes = [
        f"medians of {options.reps} reps, each rep a new agent process with the audit log off "
        f"then on; {options.deploys} deploys of {options.model_mb} MB per agent",
        "the agent hashes each payload for its audit line (in a thread above 1 MiB) and "
        "writes lines from a thread, each with its own write (not fsynced)",
    ]
    return Table("audit: the audit log's cost", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("audit", measure, Options, __doc__))
