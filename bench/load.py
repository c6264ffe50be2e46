"""Cost at real load: 8 cameras x 30 fps through the real agent, against the same agent idle.

    .venv/bin/python -m bench.load [--cameras 8] [--fps 30] [--seconds 10]

One `oak-agent run` process: first idle (cameras present, no NN deployed), then YOLO on
CAM_A of every camera. CPU from /proc/<pid>/stat over each window, peak RSS from VmHWM.
Baseline: a bare aiomqtt process publishing the agent's own payload at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio

from bench._common import (
    BLOBS,
    PREFIX,
    YOLO,
    BenchError,
    Row,
    agent_argv,
    agent_process,
    bench_broker,
    bytecode_env,
    counter,
    mxids,
    print_table,
    run_async,
    run_flood,
    supports_objects,
    watch,
    workdir,
    write_config,
)

if TYPE_CHECKING:
    from bench._common import AgentProcess, Counter, Watcher

__all__ = ["Options", "main", "measure"]

_TARGET_CPU: Final = 4.0  # % of one core above idle
_TARGET_RSS_MB: Final = 150.0
_OBJECTS: Final = 10


@dataclass(frozen=True, slots=True)
class Options:
    cameras: int = 8
    fps: float = 30.0
    seconds: float = 10.0
    settle: float = 2.0


@dataclass(frozen=True, slots=True)
class Window:
    cpu_percent: float
    delivered_rate: float


async def _window(agent: AgentProcess, sub: Counter, seconds: float) -> Window:
    count0, cpu0, t0 = sub.count, agent.cpu(), time.perf_counter()
    await anyio.sleep(seconds)
    count1, cpu1, t1 = sub.count, agent.cpu(), time.perf_counter()
    return Window(100 * (cpu1 - cpu0) / (t1 - t0), (count1 - count0) / (t1 - t0))


async def _phases(
    options: Options, watcher: Watcher, agent: AgentProcess, sub: Counter, cameras: list[str]
) -> tuple[Window, int, Window, int]:
    await watcher.online()
    await watcher.cameras_online(cameras)
    await anyio.sleep(options.settle)
    idle = await _window(agent, sub, options.seconds)
    idle_hwm = agent.kib("VmHWM")
    blob = (BLOBS / "yolo_tiny.blob").read_bytes()
    for i, mxid in enumerate(cameras):
        await watcher.deploy(
            mxid, "CAM_A", {"request_id": f"l{i}", "nn_config": YOLO, "model": blob}
        )
    for i in range(len(cameras)):
        _, event = await watcher.outcome(f"l{i}")
        if event.state != "succeeded":
            raise BenchError(f"deploy l{i} ended {event.state}: {event.error}")
    await anyio.sleep(options.settle)
    loaded = await _window(agent, sub, options.seconds)
    return idle, idle_hwm, loaded, agent.kib("VmHWM")


def _wakeup_us(rate: float = 240.0, seconds: float = 2.0) -> float:
    """CPU per asyncio.sleep wakeup at `rate`/s: the machine's floor for timer-driven work."""

    async def loop() -> tuple[int, float]:
        count, cpu0, end = 0, time.process_time(), time.perf_counter() + seconds
        while time.perf_counter() < end:
            await asyncio.sleep(1 / rate)
            count += 1
        return count, time.process_time() - cpu0

    count, cpu = asyncio.run(loop())
    return cpu / count * 1e6


def _import_floor_kib() -> int:
    """Peak RSS of a process that only imports the agent (the floor of any agent process)."""
    code = (
        "import agent.app, pathlib, re\n"
        "status = pathlib.Path('/proc/self/status').read_text()\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=bytecode_env(),
    )
    if done.returncode != 0:
        raise BenchError(f"importing the agent failed: {done.stderr[-1000:]}")
    return int(done.stdout.split()[-1])


def measure(options: Options) -> list[Row]:
    cameras = mxids(options.cameras)
    objects = _OBJECTS if supports_objects() else 3
    with workdir("load") as root, bench_broker(root) as broker:
        config, topics = write_config(
            root, broker, cameras=cameras, fps=options.fps, boot_seconds=0.2, objects=objects
        )
        filter_ = f"{topics.base}/cameras/+/streams/+/nn/detections"
        with counter(broker, filter_) as sub:
            with agent_process(agent_argv(config), root / "agent.log") as agent:

                async def run() -> tuple[Window, int, Window, int]:
                    async with watch(broker, topics) as watcher:
                        return await _phases(options, watcher, agent, sub, cameras)

                idle, idle_hwm, loaded, peak_hwm = run_async(run)
            payload = root / "payload.json"
            payload.write_bytes(sub.sample)
            rate = options.cameras * options.fps
            with counter(broker, f"{PREFIX}/flood/#") as flood_sub:
                bare = run_flood(
                    broker,
                    flood_sub,
                    "aiomqtt",
                    payload,
                    topic=f"{PREFIX}/flood/paced",
                    seconds=options.seconds,
                    rate=rate,
                )
    bare_percent = 100 * bare.cpu / bare.seconds
    floor_mb = _import_floor_kib() / 1024
    above = loaded.cpu_percent - idle.cpu_percent
    peak_mb = peak_hwm / 1024
    rows = [
        Row("idle agent CPU", f"{idle.cpu_percent:.2f} % of a core"),
        Row("loaded agent CPU", f"{loaded.cpu_percent:.2f} % of a core"),
        Row(
            "loaded above idle",
            f"{above:.2f} %",
            f"{bare_percent:.2f} % bare aiomqtt",
            f"{above / bare_percent:.2f}" if bare_percent > 0 else "",
            f"<= {_TARGET_CPU:g} %",
            above <= _TARGET_CPU,
        ),
        Row(
            "detections delivered",
            f"{loaded.delivered_rate:.1f} msg/s",
            f"{bare.rate:.1f} msg/s",
            "",
            f"{rate:g} msg/s offered",
        ),
        Row("peak RSS idle (VmHWM)", f"{idle_hwm / 1024:.1f} MB", f"{floor_mb:.1f} MB import only"),
        Row(
            "peak RSS loaded (VmHWM)",
            f"{peak_mb:.1f} MB",
            f"{floor_mb:.1f} MB import only",
            f"{peak_mb / floor_mb:.2f}",
            f"<= {_TARGET_RSS_MB:g} MB",
            peak_mb <= _TARGET_RSS_MB,
        ),
    ]
    wakeup_us = _wakeup_us(rate)
    notes = [
        f"{options.cameras} simulated cameras x {options.fps:g} fps, YOLO on CAM_A, "
        f"{objects} objects per frame, {len(sub.sample)} B JSON per message, "
        f"{options.seconds:g} s per window",
        "bare aiomqtt = one process publishing the agent's payload at the same rate, awaiting "
        "each QoS 0 publish (no frames, no encoding); its CPU excludes interpreter start-up",
        "agent CPU includes the simulator making frames (~30 µs each, see bench.throughput)",
        f"on this machine one asyncio timer wakeup alone costs ~{wakeup_us:.0f} µs CPU "
        f"(measured now at {rate:g}/s): low-rate work is wakeup-bound",
    ]
    if objects != _OBJECTS:
        notes.append(
            f"the simulator makes {objects} objects per frame (no `objects` knob yet); "
            f"the issue asks for {_OBJECTS}"
        )
    print_table("load: agent CPU and memory at 8 x 30 fps vs idle", rows, notes)
    return rows


def _parse(argv: list[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--cameras", type=int, default=defaults.cameras)
    parser.add_argument("--fps", type=float, default=defaults.fps)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="per window")
    args = parser.parse_args(argv)
    return Options(cameras=args.cameras, fps=args.fps, seconds=args.seconds)


def main(argv: list[str] | None = None) -> int:
    try:
        measure(_parse(argv))
    except BenchError as exc:
        print(f"load benchmark could not run: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
