"""Event-loop lag and CPU while depthai discovers devices, three ways.

- child: the agent's way, one long-lived `agent.cameras.discover --every` process
- one-shot: a new discovery process per scan
- thread: `getAllAvailableDevices()` in a worker thread of the agent's process

Run: .venv/bin/python bench/discovery_lag.py [scans]
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

TICK = 0.005  # the probe task sleeps this long; lag = how much later it wakes
DISCOVER = [sys.executable, "-m", "agent.cameras.discover"]


async def measure(work: Callable[[int], Awaitable[None]], scans: int) -> tuple[float, float, float]:
    lags: list[float] = []
    done = anyio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await anyio.sleep(TICK)
            lags.append(time.perf_counter() - start - TICK)

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        start = time.perf_counter()
        await work(scans)
        wall = (time.perf_counter() - start) / scans
        done.set()
    lags.sort()
    return wall, lags[int(len(lags) * 0.99)], lags[-1]


async def child(scans: int) -> None:
    command = [*DISCOVER, "--every", "0"]
    process = await anyio.open_process(command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    lines = BufferedByteReceiveStream(process.stdout)
    for _ in range(scans):
        await lines.receive_until(b"\n", 1 << 20)
    process.kill()
    await process.aclose()


async def one_shot(scans: int) -> None:
    for _ in range(scans):
        await anyio.run_process(DISCOVER, check=False)


async def thread(scans: int) -> None:
    import depthai as dai  # noqa: PLC0415 - only this variant loads depthai in-process

    for _ in range(scans):
        await anyio.to_thread.run_sync(dai.Device.getAllAvailableDevices)


async def main(scans: int) -> None:
    print(f"{scans} scans; lag = lateness of a {TICK * 1e3:.0f} ms sleep on the event loop")
    print(f"{'discovery':<10}{'wall/scan':>11}{'p99 lag':>10}{'max lag':>10}{'CPU/scan':>10}")
    for name, work in (("child", child), ("one-shot", one_shot), ("thread", thread)):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, p99, worst = await measure(work, scans)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / scans
        cpu_text = f"{cpu * 1e3:.0f}ms" if name != "thread" else "in-proc"
        lag = f"{p99 * 1e3:>8.1f}ms{worst * 1e3:>8.1f}ms"
        print(f"{name:<10}{wall * 1e3:>9.0f}ms{lag}{cpu_text:>10}")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10)
