"""Event-loop lag and CPU while depthai discovers devices, three ways.

    .venv/bin/python -m bench.discovery_lag [--scans 10]

- child: the agent's way, one long-lived `agent.cameras.discover --every` process
- one-shot: a new discovery process per scan
- thread: `getAllAvailableDevices()` in a worker thread of this process (the baseline: what
  the agent would suffer doing it in-process)

A probe task sleeps 5 ms at a time in this process's event loop; lag is how late it wakes.
Needs depthai (no device: every scan finds nothing, which takes as long as a real scan).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from bench._common import BenchError, Row, Table, cli, percentile, run_async

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["Options", "measure"]

_TICK: Final = 0.005  # the probe task sleeps this long; lag = how much later it wakes
_DISCOVER: Final = [sys.executable, "-m", "agent.cameras.discover"]
_TARGET_LAG_MS: Final = 50.0  # as for start-up: no wait the loop notices


@dataclass(frozen=True, slots=True)
class Options:
    scans: int = 10


@dataclass(frozen=True, slots=True)
class Scans:
    wall_ms: float  # per scan
    lag_p99_ms: float
    lag_max_ms: float
    child_cpu_ms: float  # per scan, in child processes (0 for the thread)


async def _measure(work: Callable[[int], Awaitable[None]], scans: int) -> Scans:
    lags: list[float] = []
    done = anyio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await anyio.sleep(_TICK)
            lags.append((time.perf_counter() - start - _TICK) * 1000)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        start = time.perf_counter()
        await work(scans)
        wall = (time.perf_counter() - start) / scans
        done.set()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Scans(wall * 1000, percentile(lags, 99), max(lags), cpu / scans * 1000)


async def _child(scans: int) -> None:
    command = [*_DISCOVER, "--every", "0"]
    process = await anyio.open_process(command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        for _ in range(scans):
            await lines.receive_until(b"\n", 1 << 20)
    except anyio.IncompleteRead as exc:
        raise BenchError(f"the discovery child exited early ({process.returncode})") from exc
    finally:
        process.kill()
        await process.aclose()


async def _one_shot(scans: int) -> None:
    for _ in range(scans):
        await anyio.run_process(_DISCOVER, check=True, stderr=subprocess.DEVNULL)


async def _thread(scans: int) -> None:
    import depthai as dai  # noqa: PLC0415 - only this variant loads depthai in-process

    for _ in range(scans):
        await anyio.to_thread.run_sync(dai.Device.getAllAvailableDevices)


def measure(options: Options) -> Table:
    try:
        import depthai  # noqa: F401, PLC0415 - only to say why it cannot run
    except ImportError as exc:
        raise BenchError(f"depthai is not installed: {exc}") from exc

    async def run() -> dict[str, Scans]:
        ways = {"child": _child, "one-shot": _one_shot, "thread": _thread}
        return {name: await _measure(work, options.scans) for name, work in ways.items()}

    results = run_async(run)
    child, thread = results["child"], results["thread"]
    rows = [
        Row(
            "child (the agent's way): loop lag max",
            f"{child.lag_max_ms:.1f} ms",
            f"{thread.lag_max_ms:.1f} ms in a thread",
            f"{child.lag_max_ms / thread.lag_max_ms:.2f}",
            f"<= {_TARGET_LAG_MS:g} ms",
            child.lag_max_ms <= _TARGET_LAG_MS,
        ),
        *(
            Row(
                f"{name}: per scan, lag p99 / max",
                f"{r.wall_ms:.0f} ms, {r.lag_p99_ms:.1f} / {r.lag_max_ms:.1f} ms",
                f"{r.child_cpu_ms:.0f} ms CPU in children" if name != "thread" else "in-process",
            )
            for name, r in results.items()
        ),
    ]
    notes = [
        f"{options.scans} scans each; lag = lateness of a {_TICK * 1e3:g} ms sleep in this "
        "process's event loop",
        "depthai's getAllAvailableDevices holds the GIL for the whole scan, so a thread "
        "does not help; a process does",
    ]
    return Table("discovery_lag: event-loop lag while depthai discovers devices", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("discovery_lag", measure, Options, __doc__))
