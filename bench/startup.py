"""Start-up: process start -> retained `online` with 8 simulated cameras, and loop lag meanwhile.

    .venv/bin/python -m bench.startup [--cameras 8] [--reps 5]

Start time: `oak-agent run` is spawned, a subscriber (already connected) times the retained
`online` and every camera's `online`. One cold start without a bytecode cache (as this
environment runs Python), then warm starts with one (as after a normal install). Baseline:
a bare aiomqtt process that connects and publishes a retained `online`.
Loop lag: `bench._lagprobe` runs the agent's `serve()` with a 2 ms probe task in the same loop;
lag is how late the probe woke, from before `serve()` until every camera said `online`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio

from agent.topics import Topics
from bench._common import (
    PREFIX,
    BenchError,
    Row,
    agent_argv,
    agent_process,
    bench_broker,
    bytecode_env,
    median,
    mxids,
    percentile,
    print_table,
    run_async,
    watch,
    workdir,
    write_config,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

__all__ = ["Options", "main", "measure"]

_TARGET_START: Final = 2.0
_TARGET_LAG_MS: Final = 50.0
_REPO: Final = __file__.rsplit("/bench/", 1)[0]
_BARE: Final = """
import sys, aiomqtt, anyio
async def main():
    async with aiomqtt.Client("127.0.0.1", int(sys.argv[1]), identifier=sys.argv[3],
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.publish(sys.argv[2], b"online", qos=1, retain=True)
anyio.run(main)
"""


@dataclass(frozen=True, slots=True)
class Start:
    online: float
    cameras: float


@dataclass(frozen=True, slots=True)
class Options:
    cameras: int = 8
    reps: int = 5


async def _start_once(root: Path, broker: Broker, cameras: list[str], *, warm: bool) -> Start:
    run_dir = root / uuid.uuid4().hex[:8]
    run_dir.mkdir()
    config, topics = write_config(run_dir, broker, cameras=cameras)
    async with watch(broker, topics) as watcher:
        env = bytecode_env(warm=warm)
        with agent_process(agent_argv(config), run_dir / "agent.log", env=env) as agent:
            online = await watcher.online()
            ready = await watcher.cameras_online(cameras)
            return Start(online - agent.started, ready - agent.started)


async def _bare_once(broker: Broker) -> float:
    topics = Topics.for_agent(PREFIX, f"bare-{uuid.uuid4().hex[:8]}")
    async with watch(broker, topics) as watcher:
        argv = [sys.executable, "-c", _BARE, str(broker.port), topics.availability, "bare"]
        started = time.perf_counter()
        # Popen returns at once; the start is timed from just before it
        process = subprocess.Popen(argv, env=bytecode_env(), cwd=_REPO)  # noqa: ASYNC220
        try:
            online = await watcher.online()
        finally:
            process.wait(timeout=30)
        return online - started


async def _lag(root: Path, broker: Broker, cameras: list[str], *, agent: bool) -> list[float]:
    """Probe lags (ms) from before serve() until every camera is online (or 3 s alone)."""
    run_dir = root / uuid.uuid4().hex[:8]
    run_dir.mkdir()
    config, topics = write_config(run_dir, broker, cameras=cameras)
    out = run_dir / "lag.json"
    argv = [sys.executable, "-m", "bench._lagprobe", "--config", str(config), "--out", str(out)]
    if not agent:
        argv.append("--no-agent")
    async with watch(broker, topics) as watcher:
        with (run_dir / "probe.log").open("wb") as log:
            process = subprocess.Popen(  # noqa: ASYNC220  # returns at once
                argv, stdout=log, stderr=subprocess.STDOUT, env=bytecode_env(), cwd=_REPO
            )
        try:
            if agent:
                await watcher.cameras_online(cameras)
            else:
                await anyio.sleep(3.0)
            ready = time.time()
            await anyio.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    if not out.exists():
        raise BenchError(f"the lag probe wrote nothing (exit {process.returncode})")
    samples = json.loads(out.read_text())
    return [lag * 1000 for at, lag in samples if at <= ready]


def measure(options: Options) -> list[Row]:
    cameras = mxids(options.cameras)
    with workdir("startup") as root, bench_broker(root) as broker:

        async def run() -> tuple[Start, list[Start], list[float], list[float], list[float]]:
            cold = await _start_once(root, broker, cameras, warm=False)
            await _start_once(root, broker, cameras, warm=True)  # fills the bytecode cache
            warm = [
                await _start_once(root, broker, cameras, warm=True) for _ in range(options.reps)
            ]
            bare = [await _bare_once(broker) for _ in range(options.reps)]
            lag = await _lag(root, broker, cameras, agent=True)
            floor = await _lag(root, broker, cameras, agent=False)
            return cold, warm, bare, lag, floor

        cold, warm, bare, lag, floor = run_async(run)
    online = median([s.online for s in warm])
    ready = median([s.cameras for s in warm])
    bare_online = median(bare)
    lag_max, floor_max = max(lag, default=0.0), max(floor, default=0.0)
    rows = [
        Row(
            "start -> retained online (warm)",
            f"{online:.2f} s",
            f"{bare_online:.2f} s bare aiomqtt",
            f"{online / bare_online:.1f}x",
            f"<= {_TARGET_START:g} s",
            online <= _TARGET_START,
        ),
        Row(
            f"start -> all {options.cameras} cameras online (warm)",
            f"{ready:.2f} s",
            "",
            "",
            f"<= {_TARGET_START:g} s",
            ready <= _TARGET_START,
        ),
        Row("start -> online (cold, no bytecode cache)", f"{cold.online:.2f} s"),
        Row("start -> all cameras online (cold)", f"{cold.cameras:.2f} s"),
        Row(
            "loop lag during start-up: max",
            f"{lag_max:.1f} ms",
            f"{floor_max:.1f} ms idle loop",
            "",
            f"<= {_TARGET_LAG_MS:g} ms",
            lag_max <= _TARGET_LAG_MS,
        ),
        Row(
            "loop lag during start-up: p99 / p50",
            f"{percentile(lag, 99):.1f} / {percentile(lag, 50):.2f} ms",
            f"{percentile(floor, 99):.1f} / {percentile(floor, 50):.2f} ms",
        ),
    ]
    notes = [
        f"medians of {options.reps} warm starts; simulated cameras (no device discovery: "
        "with depthai, discovery holds the GIL ~0.5 s and is not covered here)",
        f"lag: {len(lag)} probe samples (2 ms sleeps) from before serve() to all cameras "
        "online; imports (before the loop exists) are start time, not lag",
        f"cold start: PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r} "
        "and no cache, so every module is compiled",
    ]
    print_table("startup: process start -> online, loop lag", rows, notes)
    return rows


def _parse(argv: list[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--cameras", type=int, default=defaults.cameras)
    parser.add_argument("--reps", type=int, default=defaults.reps)
    args = parser.parse_args(argv)
    return Options(cameras=args.cameras, reps=args.reps)


def main(argv: list[str] | None = None) -> int:
    try:
        measure(_parse(argv))
    except BenchError as exc:
        print(f"startup benchmark could not run: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
