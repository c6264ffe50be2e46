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

import json
import os
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
    Table,
    agent_argv,
    bench_site,
    bytecode_env,
    cli,
    median,
    mxids,
    percentile,
    run_async,
    spawned,
    watch,
)

if TYPE_CHECKING:
    from bench._common import Site

__all__ = ["Options", "measure"]

_TARGET_START: Final = 2.0
_TARGET_LAG_MS: Final = 50.0
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


async def _start_once(site: Site, cameras: list[str], *, warm: bool) -> Start:
    config, topics = site.config(cameras=cameras)
    async with watch(site.broker, topics) as watcher:
        log, env = config.parent / "agent.log", bytecode_env(warm=warm)
        with spawned(agent_argv(config), log, env=env) as agent:
            online = await watcher.online()
            ready = await watcher.cameras_online(cameras)
            return Start(online - agent.started, ready - agent.started)


async def _bare_once(site: Site) -> float:
    name = f"bare-{uuid.uuid4().hex[:8]}"
    topics = Topics.for_agent(PREFIX, name)
    argv = [sys.executable, "-c", _BARE, str(site.broker.port), topics.availability, name]
    async with watch(site.broker, topics) as watcher:
        with spawned(argv, site.root / f"{name}.log", what="the bare client") as bare:
            return await watcher.online() - bare.started


async def _lag(site: Site, cameras: list[str], *, agent: bool) -> list[float]:
    """Probe lags (ms) from before serve() until every camera is online (or 3 s alone)."""
    config, topics = site.config(cameras=cameras)
    out = config.parent / "lag.json"
    argv = [sys.executable, "-m", "bench._lagprobe", "--config", str(config), "--out", str(out)]
    if not agent:
        argv.append("--no-agent")
    async with watch(site.broker, topics) as watcher:
        with spawned(argv, config.parent / "probe.log", what="the lag probe") as probe:
            if agent:
                await watcher.cameras_online(cameras)
            else:
                await anyio.sleep(3.0)
            ready = time.time()
            await anyio.sleep(0.2)
            probe.check()
    if not out.exists():
        raise BenchError(f"the lag probe wrote nothing (exit {probe.popen.returncode})")
    samples = json.loads(out.read_text())
    return [lag * 1000 for at, lag in samples if at <= ready]


def measure(options: Options) -> Table:
    cameras = mxids(options.cameras)
    with bench_site("startup") as site:

        async def run() -> tuple[Start, list[Start], list[float], list[float], list[float]]:
            cold = await _start_once(site, cameras, warm=False)
            await _start_once(site, cameras, warm=True)  # fills the bytecode cache
            warm = [await _start_once(site, cameras, warm=True) for _ in range(options.reps)]
            bare = [await _bare_once(site) for _ in range(options.reps)]
            lag = await _lag(site, cameras, agent=True)
            floor = await _lag(site, cameras, agent=False)
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
    return Table("startup: process start -> online, loop lag", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("startup", measure, Options, __doc__))
