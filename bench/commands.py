"""Commands per second: bursts of small commands, state writes grouped vs one per command.

    .venv/bin/python -m bench.commands [--commands 400 --cameras 8 --reps 3]

Every accepted command is on disk (fsynced) before its `accepted`. The agent groups the
state writes: while one write is under way, the commands that arrive are staged and the
next write records them all. The baseline, in the same run, is the agent with
`group_writes=False` (`bench/_agent.py --one-write-per-command`): each command waits for
its own write before the next is handled, as before the grouping.

Two bursts, all commands published at once (QoS 1): deploys by `model_sha256` (the model
was uploaded once before) round-robin over every stream of every camera, each with a new
confidence threshold (a new network: restarts, and later ones supersede earlier ones on
the same stream); and deletes of streams that run nothing (answered without a restart).
Rate = commands / (first publish -> the last command's `accepted`).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
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
    top_functions,
    yolo,
)

if TYPE_CHECKING:
    from pathlib import Path

    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_STREAMS: Final = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")
_TARGET_RATIO: Final = 2.0
_IN_FLIGHT: Final = 20  # paho's default window of unacknowledged QoS 1 publishes


@dataclass(frozen=True, slots=True)
class Options:
    commands: int = 400
    cameras: int = 8
    boot: float = 0.2
    fps: float = 2.0  # few detections: this is about commands
    reps: int = 3
    profile: Path | None = field(
        default=None, metadata={"help": "cProfile the grouped agent (last rep) into this file"}
    )


@dataclass(frozen=True, slots=True)
class Burst:
    rate: float  # commands accepted per second
    done: float  # first publish -> last terminal event, seconds
    answered_once: bool  # every command: one `accepted`, one terminal event


class _Tally:
    """Reads the watcher's events once each: `accepted` and terminal events per request."""

    def __init__(self, watcher: Watcher, ids: list[str]) -> None:
        self._watcher = watcher
        self._wanted = set(ids)
        self._read = 0
        self.accepted: dict[str, list[float]] = {i: [] for i in ids}
        self.terminal: dict[str, list[float]] = {i: [] for i in ids}

    def _update(self) -> None:
        events = self._watcher.events
        for at, event in events[self._read :]:
            if event.request_id in self._wanted:
                if event.state == "accepted":
                    self.accepted[event.request_id].append(at)
                if event.terminal:
                    self.terminal[event.request_id].append(at)
        self._read = len(events)

    def all_accepted(self) -> float | None:
        self._update()
        if all(self.accepted.values()):
            return max(at[0] for at in self.accepted.values())
        return None

    def all_answered(self) -> float | None:
        self._update()
        if all(self.terminal.values()):
            return max(at[0] for at in self.terminal.values())
        return None

    def once(self) -> bool:
        self._update()
        return all(len(a) == 1 for a in self.accepted.values()) and all(
            len(t) == 1 for t in self.terminal.values()
        )


class _Sender:
    def __init__(self, watcher: Watcher, cameras: list[str]) -> None:
        self.watcher = watcher
        self.cameras = cameras
        self.blob = (BLOBS / "yolo_tiny.blob").read_bytes()
        self.sha = hashlib.sha256(self.blob).hexdigest()
        self._ids = 0
        self._threshold = 0.0

    def _id(self, kind: str) -> str:
        self._ids += 1
        return f"{kind}{self._ids}"

    async def upload(self) -> None:
        request_id = self._id("upload")
        body = {"request_id": request_id, "nn_config": yolo(), "model": self.blob}
        await self.watcher.deploy(self.cameras[0], "CAM_A", body)
        await self.watcher.succeeded(request_id)
        delete = self.watcher.topics.command(self.cameras[0], "CAM_A", "delete")
        request_id = self._id("clear")
        await self.watcher.client.publish(delete, f'{{"request_id":"{request_id}"}}', qos=1)
        await self.watcher.succeeded(request_id)

    def deploys(self, count: int) -> list[tuple[str, str, bytes]]:
        commands = []
        targets = [(m, s) for m in self.cameras for s in _STREAMS]
        for n in range(count):
            mxid, stream = targets[n % len(targets)]
            self._threshold = (self._threshold + 0.0007) % 0.9
            request_id = self._id("d")
            body = (
                f'{{"request_id":"{request_id}","model_sha256":"{self.sha}",'
                f'"nn_config":{{"type":"YOLO","nn_config":{{"num_classes":80,'
                f'"anchors":[10,14,23,27,37,58,81,82,135,169,344,319],'
                f'"anchor_masks":{{"side26":[0,1,2],"side13":[3,4,5]}},'
                f'"confidence_threshold":{round(0.05 + self._threshold, 4)}}}}}}}'
            )
            topic = self.watcher.topics.command(mxid, stream, "deploy")
            commands.append((request_id, topic, body.encode()))
        return commands

    def deletes(self, count: int, cameras: list[str]) -> list[tuple[str, str, bytes]]:
        commands = []
        targets = [(m, s) for m in cameras for s in _STREAMS]
        for n in range(count):
            mxid, stream = targets[n % len(targets)]
            request_id = self._id("x")
            topic = self.watcher.topics.command(mxid, stream, "delete")
            commands.append((request_id, topic, f'{{"request_id":"{request_id}"}}'.encode()))
        return commands

    async def burst(self, commands: list[tuple[str, str, bytes]]) -> Burst:
        tally = _Tally(self.watcher, [c[0] for c in commands])
        client = self.watcher.client
        start = time.perf_counter()
        limiter = anyio.CapacityLimiter(_IN_FLIGHT)

        async def publish(topic: str, payload: bytes) -> None:
            async with limiter:
                await client.publish(topic, payload, qos=1)

        async with anyio.create_task_group() as tg:  # as fast as the broker acknowledges
            for _, topic, payload in commands:
                tg.start_soon(publish, topic, payload)
        accepted = await self.watcher.wait_for(tally.all_accepted, "every accepted", 120)
        answered = await self.watcher.wait_for(tally.all_answered, "every answer", 120)
        await anyio.sleep(0.3)  # a late second answer would show up here
        return Burst(len(commands) / (accepted - start), answered - start, tally.once())


def measure(options: Options) -> Table:
    cameras = mxids(options.cameras)
    # deletes go to cameras that never ran anything: each is answered without a restart
    idle = [f"IDLE{i:02d}" for i in range(2)]
    results: dict[bool, tuple[list[Burst], list[Burst]]] = {}
    with bench_site("commands") as site:
        for grouped in (False, True):  # the baseline first, then the grouped writes
            deploys: list[Burst] = []
            deletes: list[Burst] = []
            for _ in range(options.reps):
                config, topics = site.config(
                    cameras=[*cameras, *idle], boot_seconds=options.boot, fps=options.fps
                )
                head = [sys.executable]
                if grouped and options.profile is not None:
                    head += ["-m", "cProfile", "-o", str(options.profile)]
                argv = [*head, "-m", "bench._agent", "--config", str(config)]
                if not grouped:
                    argv.append("--one-write-per-command")

                async def job(watcher: Watcher, _: Process) -> tuple[Burst, Burst]:
                    sender = _Sender(watcher, cameras)
                    await sender.upload()
                    one = await sender.burst(sender.deploys(options.commands))
                    two = await sender.burst(sender.deletes(options.commands, idle))
                    return one, two

                one, two = site.run_agent(config, topics, job, cameras=[*cameras, *idle], argv=argv)
                deploys.append(one)
                deletes.append(two)
            results[grouped] = (deploys, deletes)
    return _table(options, results)


def _table(options: Options, results: dict[bool, tuple[list[Burst], list[Burst]]]) -> Table:
    rows = []
    for index, what in enumerate(
        ("deploys (restarts, supersedes), all streams", "deletes needing no restart")
    ):
        grouped = results[True][index]
        single = results[False][index]
        rate, base = median([b.rate for b in grouped]), median([b.rate for b in single])
        ratio = rate / base
        rows += [
            Row(
                f"{options.commands} {what}: commands/s",
                f"{rate:,.0f}",
                f"{base:,.0f} one write per command",
                f"{ratio:.2f}",
                f">= {_TARGET_RATIO:g}x",
                ratio >= _TARGET_RATIO,
            ),
            Row(
                "  first publish -> last answer",
                f"{median([b.done for b in grouped]):.2f} s",
                f"{median([b.done for b in single]):.2f} s",
            ),
            Row(
                "  one accepted and one answer each",
                "yes" if all(b.answered_once for b in grouped) else "NO",
                "yes" if all(b.answered_once for b in single) else "NO",
                "",
                "yes",
                all(b.answered_once for b in grouped + single),
            ),
        ]
    notes = [
        f"{options.cameras} cameras x {len(_STREAMS)} streams, simulated boot {options.boot:g} s, "
        f"{options.fps:g} fps; "
        f"medians of {options.reps} bursts, each against a new agent process",
        "rate = commands / (first publish -> last accepted); every accepted command is "
        "fsynced to state.json before its accepted",
    ]
    title = "commands: bursts of small commands, grouped state writes"
    return Table(title, rows, notes, top_functions(options.profile))


if __name__ == "__main__":
    sys.exit(cli("commands", measure, Options, __doc__))
