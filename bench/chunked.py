"""Chunked upload throughput through a mosquitto capped at 128 KiB; inline through an uncapped one.

    .venv/bin/python -m bench.chunked [--reps 3 --size 20 --chunk-kib 96 --window 8]

Each rep makes a fresh model (a real blob padded with random bytes to `size` MB). Chunked:
the manifest, then every chunk at QoS 1 with `window` publishes in flight (as a fleet
controller would), through a mosquitto with `max_packet_size 131072`; measured from the
manifest's publish to the retained `stored` status (every chunk journaled, the whole model
hashed and parsed by depthai, renamed into the store). Baseline, in the same run: the same
size inline in one MessagePack deploy through an uncapped mosquitto, from its publish to
`accepted` (the model hashed, written, fsynced and parsed; the state file written).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import msgspec

from bench._common import BLOBS, YOLO, BenchError, Row, Site, Table, cli, median, mxids
from tests.brokers import BrokerUnavailable, run_broker

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.messages import Event
    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_MB: Final = 1024 * 1024
_CAP: Final = 131072


@dataclass(frozen=True, slots=True)
class Options:
    reps: int = 3
    size: int = 20  # MB
    chunk_kib: int = 96
    window: int = 8  # chunk publishes in flight


def _model(size: int) -> bytes:
    base = (BLOBS / "yolo_tiny.blob").read_bytes()
    return base + os.urandom(size - len(base))


@contextlib.contextmanager
def _sites() -> Iterator[tuple[Site, Site]]:
    """A capped and an uncapped mosquitto, each with its own folder; gone on exit."""
    with tempfile.TemporaryDirectory(prefix="oak-bench-chunked-") as tmp:
        root = Path(tmp)
        capped_settings = ("allow_anonymous true", f"max_packet_size {_CAP}")
        try:
            with (
                run_broker("mosquitto", root / "capped", settings=capped_settings) as capped,
                run_broker("mosquitto", root / "open") as uncapped,
            ):
                (root / "c").mkdir()
                (root / "u").mkdir()
                yield Site(root / "c", capped), Site(root / "u", uncapped)
        except BrokerUnavailable as exc:
            raise BenchError(f"cannot start mosquitto: {exc}") from exc


async def _send_chunks(watcher: Watcher, data: bytes, sha: str, chunk: int, window: int) -> None:
    """Every chunk at QoS 1, `window` publishes in flight."""
    slots = anyio.Semaphore(window)

    async def send(offset: int) -> None:
        try:
            await watcher.client.publish(
                watcher.topics.chunk(sha, offset), data[offset : offset + chunk], qos=1
            )
        finally:
            slots.release()

    async with anyio.create_task_group() as tg:
        for offset in range(0, len(data), chunk):
            await slots.acquire()
            tg.start_soon(send, offset)


async def _chunked(options: Options, watcher: Watcher, agent: Process) -> list[float]:
    chunk = options.chunk_kib * 1024
    seconds = []
    for n in range(options.reps):
        data = _model(options.size * _MB)
        sha = hashlib.sha256(data).hexdigest()
        status = watcher.topics.upload_status(sha)
        manifest = {"size": len(data), "chunk_size": chunk, "model_name": f"bench-{n}"}
        started = time.perf_counter()
        await watcher.client.publish(
            watcher.topics.upload(sha), msgspec.json.encode(manifest), qos=1
        )
        await _send_chunks(watcher, data, sha, chunk, options.window)

        def stored(status: str = status) -> bool | None:
            seen = watcher.latest(status)
            return True if seen is not None and b'"stored"' in seen.payload else None

        await watcher.wait_for(stored, f"upload {n} stored", bound=120)
        seconds.append(time.perf_counter() - started)
        agent.check()
    return seconds


async def _inline(options: Options, watcher: Watcher, agent: Process, camera: str) -> list[float]:
    seconds = []
    for n in range(options.reps):
        body = {"request_id": f"i{n}", "nn_config": YOLO, "model": _model(options.size * _MB)}
        payload = msgspec.msgpack.encode(body)
        sent = await watcher.deploy(camera, "CAM_A", body, payload=payload)
        request_id = f"i{n}"

        def answered(request_id: str = request_id) -> tuple[float, Event] | None:
            return watcher.event(request_id, "accepted") or watcher.terminal(request_id)

        at, event = await watcher.wait_for(answered, f"inline {n} accepted")
        if event.state != "accepted":
            raise BenchError(f"inline deploy {n} ended {event.state}: {event.error}")
        seconds.append(at - sent)
        await watcher.succeeded(f"i{n}")
        agent.check()
    return seconds


def measure(options: Options) -> Table:
    (camera,) = mxids(1)
    if options.chunk_kib * 1024 + 1024 > _CAP:
        raise BenchError(f"a chunk of {options.chunk_kib} KiB does not fit the 128 KiB cap")
    with _sites() as (capped, uncapped):
        config, topics = capped.config(cameras=[camera], fps=2.0)

        async def chunked(watcher: Watcher, agent: Process) -> list[float]:
            return await _chunked(options, watcher, agent)

        extra = (f"{topics.base}/models/+/status",)
        up = capped.run_agent(config, topics, chunked, cameras=[camera], extra=extra)
        config, topics = uncapped.config(cameras=[camera], fps=2.0)

        async def inline(watcher: Watcher, agent: Process) -> list[float]:
            return await _inline(options, watcher, agent, camera)

        down = uncapped.run_agent(config, topics, inline, cameras=[camera])
    mb = options.size * _MB / 1e6
    rate, baseline = mb / median(up), mb / median(down)
    rows = [
        Row(
            f"{options.size} MiB model: chunked through a 128 KiB cap, p50",
            f"{median(up):.2f} s = {rate:.1f} MB/s",
            f"{median(down):.2f} s = {baseline:.1f} MB/s inline, uncapped",
            f"{rate / baseline:.2f}x",
        ),
        Row(
            "  chunked, each rep",
            " / ".join(f"{s:.2f}" for s in up) + " s",
            " / ".join(f"{s:.2f}" for s in down) + " s",
        ),
    ]
    notes = [
        f"{options.reps} reps, fresh models; chunks of {options.chunk_kib} KiB at QoS 1, "
        f"{options.window} in flight; manifest publish -> `stored` status (journaled, hashed, "
        "parsed, in the store)",
        "baseline: one MessagePack deploy with the model inline through an uncapped mosquitto, "
        "publish -> `accepted` (hashed, written, fsynced, parsed, state written)",
        "through the capped broker the inline deploy cannot be sent at all (the broker drops "
        "the sender): that is the point; the ratio is what chunking costs",
    ]
    return Table("chunked: large models through a size-capped broker", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("chunked", measure, Options, __doc__))
