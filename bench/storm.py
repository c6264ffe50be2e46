"""Command storms: 50 deploys to one camera within a second, and 8 cameras deploying at once.

    .venv/bin/python -m bench.storm [--deploys 50] [--cameras 8] [--boot 1.0]

Every deploy changes the network (a different confidence threshold), so none can be settled
without a restart. Restarts are read from the camera's retained status (`restarts`).
Baselines: one deploy alone on the same camera (storm), one camera alone (parallel).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio

from bench._common import (
    BLOBS,
    Row,
    Table,
    bench_site,
    cli,
    median,
    mxids,
    yolo,
)

if TYPE_CHECKING:
    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_TARGET_RESTARTS: Final = 2
_TARGET_PARALLEL: Final = 1.3


@dataclass(frozen=True, slots=True)
class Options:
    deploys: int = 50
    within: float = 1.0
    cameras: int = 8
    boot: float = 1.0
    reps: int = 3


@dataclass(frozen=True, slots=True)
class Storm:
    single: float
    restarts: int
    terminal_requests: int
    terminal_events: int
    states: dict[str, int]
    quiet: float


class _Deployer:
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.blob = (BLOBS / "yolo_tiny.blob").read_bytes()
        self._ids = 0
        self._threshold = 0.0

    def next_config(self) -> dict[str, object]:
        # a new threshold every time: a different network, so a restart is needed
        self._threshold = (self._threshold + 0.0007) % 0.9
        return yolo(0.05 + self._threshold)

    async def send(self, mxid: str) -> tuple[str, float]:
        self._ids += 1
        request_id = f"s{self._ids}"
        body = {"request_id": request_id, "nn_config": self.next_config(), "model": self.blob}
        return request_id, await self.watcher.deploy(mxid, "CAM_A", body)

    async def once(self, mxid: str) -> float:
        """One deploy, command -> succeeded, in seconds."""
        request_id, sent = await self.send(mxid)
        return await self.watcher.succeeded(request_id) - sent


async def _restarts(watcher: Watcher, mxid: str) -> int:
    status = await watcher.wait_for(lambda: watcher.status(mxid), f"status of {mxid}")
    return status.restarts


async def _storm(options: Options, deployer: _Deployer, mxid: str) -> Storm:
    watcher = deployer.watcher
    single = await deployer.once(mxid)
    await anyio.sleep(0.3)
    before = await _restarts(watcher, mxid)
    ids: list[str] = []
    start = time.perf_counter()
    for i in range(options.deploys):
        delay = start + i * options.within / options.deploys - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        request_id, _ = await deployer.send(mxid)
        ids.append(request_id)
    ends = [await watcher.outcome(r) for r in ids]
    quiet = max(at for at, _ in ends) - start

    def settled() -> int | None:
        status = watcher.status(mxid)
        ok = (
            status is not None
            and status.state == "online"
            and status.nn["CAM_A"].state == "running"
        )
        return status.restarts if ok and status is not None else None

    await anyio.sleep(0.5)  # anything late would show up here
    after = await watcher.wait_for(settled, f"{mxid} settled")
    wanted = set(ids)
    terminal = [e for _, e in watcher.events if e.request_id in wanted and e.terminal]
    states: dict[str, int] = {}
    for event in terminal:
        states[event.state] = states.get(event.state, 0) + 1
    return Storm(
        single=single,
        restarts=after - before,
        terminal_requests=len({e.request_id for e in terminal}),
        terminal_events=len(terminal),
        states=states,
        quiet=quiet,
    )


async def _parallel(
    options: Options, deployer: _Deployer, cameras: list[str]
) -> tuple[float, float]:
    """Median of one camera alone and of all cameras at once (command -> last succeeded)."""
    ones, alls = [], []
    for _ in range(options.reps):
        ones.append(await deployer.once(cameras[0]))
        sent = [await deployer.send(m) for m in cameras]
        ends = [await deployer.watcher.succeeded(r) for r, _ in sent]
        alls.append(max(ends) - sent[0][1])
    return median(ones), median(alls)


def measure(options: Options) -> Table:
    cameras = mxids(options.cameras)
    with bench_site("storm") as site:
        config, topics = site.config(cameras=cameras, boot_seconds=options.boot)

        async def job(watcher: Watcher, _: Process) -> tuple[Storm, float, float]:
            deployer = _Deployer(watcher)
            storm = await _storm(options, deployer, cameras[0])
            one, together = await _parallel(options, deployer, cameras)
            return storm, one, together

        storm, one, together = site.run_agent(config, topics, job, cameras=cameras)
    states = ", ".join(f"{k} {v}" for k, v in sorted(storm.states.items()))
    ratio = together / one
    rows = [
        Row(
            f"{options.deploys} deploys in {options.within:g} s: restarts",
            str(storm.restarts),
            "1 (one deploy)",
            "",
            f"<= {_TARGET_RESTARTS}",
            storm.restarts <= _TARGET_RESTARTS,
        ),
        Row(
            "  terminal events",
            f"{storm.terminal_events} for {storm.terminal_requests} requests",
            "",
            "",
            f"{options.deploys}, one each",
            storm.terminal_events == options.deploys == storm.terminal_requests,
        ),
        Row("  outcomes", states),
        Row(
            "  first command -> last terminal event",
            f"{storm.quiet:.2f} s",
            f"{storm.single:.2f} s one deploy",
            f"{storm.quiet / storm.single:.2f}",
        ),
        Row(
            f"{options.cameras} cameras at once -> last succeeded",
            f"{together:.3f} s",
            f"{one:.3f} s one camera",
            f"{ratio:.2f}",
            f"<= {_TARGET_PARALLEL:g}x",
            ratio <= _TARGET_PARALLEL,
        ),
    ]
    notes = [
        f"simulated boot {options.boot:g} s; YOLO on CAM_A with a new threshold per deploy; "
        f"the parallel lines are medians of {options.reps} rounds",
        "quiet = the first storm command was published -> the last request's terminal event",
    ]
    return Table("storm: many deploys to one camera, many cameras at once", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("storm", measure, Options, __doc__))
