"""Command latency with inline models of 1, 5 and 20 MB, JSON (base64) and MessagePack.

    .venv/bin/python -m bench.latency [--reps 15] [--sizes 0,1,5,20] [--profile agent.prof]

Each deploy carries a fresh blob: tests/data/blobs/yolo_tiny.blob followed by random bytes up
to the size. depthai parses such a blob like the original (it reads the whole file), and every
one has its own sha256, so the agent stores and parses each one, as it would a new model.
Measured in the bench process: publish (QoS 1) -> `accepted` arrives, and `succeeded` arrives
minus the simulated boot. Baseline: the same payload published to a plain topic and received
by a subscriber (the transport's own one-way time).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final

import msgspec

from bench._common import (
    BLOBS,
    PREFIX,
    YOLO,
    Row,
    Table,
    bench_site,
    cli,
    median,
    mxids,
    percentile,
    top_functions,
)

if TYPE_CHECKING:
    from pathlib import Path

    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_MB: Final = 1024 * 1024
_TARGETS_MS: Final = {5: 30.0, 20: 100.0}  # accepted p99, by model size in MB
_BOOT: Final = 0.3


@dataclass(frozen=True, slots=True)
class Options:
    sizes: tuple[int, ...] = field(
        default=(0, 1, 5, 20), metadata={"help": "MB; 0 is the 13 KB blob as it is"}
    )
    reps: int = 15
    baseline_reps: int = 5
    profile: Path | None = field(
        default=None, metadata={"help": "run the agent under cProfile, save the stats here"}
    )


@dataclass
class Samples:
    payload_bytes: int = 0
    accepted: list[float] | None = None
    succeeded: list[float] | None = None
    transport: list[float] | None = None


def _blob(size: int) -> bytes:
    base = (BLOBS / "yolo_tiny.blob").read_bytes()
    # at least 16 random bytes: every deploy is a new model, even at size 0
    return base + os.urandom(max(16, size - len(base)))


def _encode(body: dict[str, object], encoding: str) -> bytes:
    return msgspec.json.encode(body) if encoding == "json" else msgspec.msgpack.encode(body)


async def _transport(watcher: Watcher, payload: bytes, reps: int) -> list[float]:
    """One-way publish -> receive of `payload` through mosquitto, in milliseconds."""
    times = []
    for _ in range(reps):
        topic = f"{PREFIX}/echo/{uuid.uuid4().hex[:8]}"
        sent = time.perf_counter()
        await watcher.client.publish(topic, payload, qos=1, timeout=30)
        seen = await watcher.wait_for(partial(watcher.arrival, topic), "echo")
        times.append((seen.at - sent) * 1000)
    return times


async def _deploys(
    options: Options, watcher: Watcher, agent: Process, camera: str
) -> dict[tuple[int, str], Samples]:
    results: dict[tuple[int, str], Samples] = {}
    for size in options.sizes:
        for encoding in ("json", "msgpack"):
            samples = Samples(accepted=[], succeeded=[])
            for rep in range(options.reps):
                request_id = f"lat-{size}-{encoding}-{rep}"
                body: dict[str, object] = {
                    "request_id": request_id,
                    "nn_config": YOLO,
                    "model": _blob(size * _MB),
                }
                payload = _encode(body, encoding)
                samples.payload_bytes = len(payload)
                sent = await watcher.deploy(camera, "CAM_A", body, payload=payload)
                accepted = await watcher.wait_for(
                    partial(watcher.event, request_id, "accepted"), f"{request_id} accepted"
                )
                done = await watcher.succeeded(request_id)
                assert samples.accepted is not None
                assert samples.succeeded is not None
                samples.accepted.append((accepted[0] - sent) * 1000)
                samples.succeeded.append((done - sent - _BOOT) * 1000)
                agent.check()
            samples.transport = await _transport(watcher, payload, options.baseline_reps)
            results[(size, encoding)] = samples
    return results


def measure(options: Options) -> Table:
    camera = mxids(1)[0]
    with bench_site("latency") as site:
        config, topics = site.config(cameras=[camera], boot_seconds=_BOOT)

        async def job(watcher: Watcher, agent: Process) -> dict[tuple[int, str], Samples]:
            return await _deploys(options, watcher, agent, camera)

        results = site.run_agent(
            config, topics, job, profile=options.profile, extra=(f"{PREFIX}/echo/#",)
        )
    rows = []
    for (size, encoding), samples in results.items():
        assert samples.accepted
        assert samples.succeeded
        assert samples.transport
        p50, p99 = percentile(samples.accepted, 50), percentile(samples.accepted, 99)
        floor = median(samples.transport)
        target = _TARGETS_MS.get(size)
        name = f"{size} MB" if size else "13 KB"
        label = f"{name} {encoding} ({samples.payload_bytes / _MB:.2f} MB sent)"
        rows.append(
            Row(
                f"{label}: accepted p50 / p99",
                f"{p50:.1f} / {p99:.1f} ms",
                f"{floor:.1f} ms transport",
                f"{p50 / floor:.1f}x",
                f"p99 <= {target:g} ms" if target else "",
                None if target is None else p99 <= target,
            )
        )
        rows.append(
            Row(
                f"{label}: succeeded - boot p50 / p99",
                f"{percentile(samples.succeeded, 50):.1f} / "
                f"{percentile(samples.succeeded, 99):.1f} ms",
            )
        )
    notes = [
        f"{options.reps} deploys per line, each with a new blob (sha256 differs), one simulated "
        f"camera booting {_BOOT:g} s; p99 of {options.reps} samples is their maximum",
        "accepted = the agent decoded the command, hashed, wrote + fsynced and parsed the "
        "blob (depthai), then emitted the event; the time includes sending the payload",
        f"transport = median of {options.baseline_reps} one-way QoS 1 deliveries of the same "
        "payload to a subscriber in this process",
    ]
    if options.profile is not None:
        notes.append("the agent ran under cProfile: its numbers here are inflated")
    title = "latency: deploy command -> events, inline models"
    return Table(title, rows, notes, top_functions(options.profile))


if __name__ == "__main__":
    sys.exit(cli("latency", measure, Options, __doc__))
