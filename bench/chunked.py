"""Chunked upload through a broker capped at 128 KiB vs the inline deploy through an uncapped one.

    .venv/bin/python -m bench.chunked [--reps 3 --size 20 --chunk-kib 0 --window 8]

Each rep makes a new model of `size` MB (a real blob padded with random bytes). Chunked: the
client's own sender (`agent.sender.send_model`, what `oak-agent upload` runs: chunks of
`chunk_kib` KiB, 0 for the largest that fits the cap; `window` QoS 1 chunks in flight) through
a mosquitto with `max_packet_size 131072`, timed from the manifest to the retained status
`stored`. Baseline, in the same run: the same size inline in one MessagePack deploy through
an uncapped mosquitto, timed from the publish to `accepted` (the agent has then stored and
parsed it too). Through the capped broker the inline deploy cannot be sent at all (the broker
drops the sender): that is the point; the ratio is what chunking costs. One agent per broker.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import aiomqtt
import msgspec

from agent.chunkplan import chunk_size_for
from agent.sender import ModelFile, send_model
from bench._common import (
    BLOBS,
    YOLO,
    BenchError,
    Row,
    Site,
    Table,
    bench_site,
    cli,
    median,
    mxids,
)
from tests.brokers import BrokerUnavailable, run_broker

if TYPE_CHECKING:
    from pathlib import Path

    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_MB: Final = 1024 * 1024
_CAP: Final = 131072


@dataclass(frozen=True, slots=True)
class Options:
    reps: int = 3
    size: int = 20  # MB
    chunk_kib: int = 0  # 0: the largest multiple of 4 KiB that fits the cap
    window: int = 8  # chunks in flight


def _model(folder: Path, size: int, n: int) -> ModelFile:
    base = (BLOBS / "yolo_tiny.blob").read_bytes()
    data = base + os.urandom(size - len(base))  # a new model every time
    path = folder / f"model-{n}.blob"
    path.write_bytes(data)
    return ModelFile(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _chunk_size(options: Options, topic: str) -> int:
    fits = chunk_size_for(_CAP, topic, mqtt5=True)
    if options.chunk_kib == 0:
        return fits
    if options.chunk_kib * 1024 > fits:
        raise BenchError(f"a chunk of {options.chunk_kib} KiB does not fit the 128 KiB cap")
    return options.chunk_kib * 1024


async def _chunked(
    options: Options, site: Site, watcher: Watcher, agent: Process
) -> list[tuple[float, int, int]]:
    """Per rep: seconds, chunks sent, bytes sent."""
    seconds = []
    async with aiomqtt.Client(
        site.broker.host,
        site.broker.port,
        protocol=aiomqtt.ProtocolVersion.V5,
        identifier=f"bench-sender-{uuid.uuid4().hex[:8]}",
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        for n in range(options.reps):
            model = _model(site.root, options.size * _MB, n)
            chunk = _chunk_size(options, watcher.topics.chunk(model.sha256, model.size))
            started = time.perf_counter()
            sent = await send_model(
                client,
                watcher.topics,
                model,
                chunk_size=chunk,
                progress=lambda _d, _t: None,
                window=options.window,
            )
            seconds.append((time.perf_counter() - started, sent.chunks, sent.bytes))
            if sent.status is None or sent.status.state != "stored":
                raise BenchError(f"chunked upload ended {sent.status}")
            if sent.bytes != model.size:
                raise BenchError(f"sent {sent.bytes} bytes of {model.size}")
            agent.check()
    return seconds


async def _inline(
    options: Options, site: Site, watcher: Watcher, agent: Process, camera: str
) -> list[float]:
    seconds = []
    for n in range(options.reps):
        model = _model(site.root, options.size * _MB, 100 + n)
        body = {"request_id": f"inline{n}", "nn_config": YOLO, "model": model.path.read_bytes()}
        sent = await watcher.deploy(camera, "CAM_A", body, payload=msgspec.msgpack.encode(body))
        at, _ = await watcher.wait_for(partial(watcher.event, f"inline{n}", "accepted"), "accepted")
        seconds.append(at - sent)
        await watcher.succeeded(f"inline{n}")
        agent.check()
    return seconds


def measure(options: Options) -> Table:
    (camera,) = mxids(1)
    with bench_site("chunked") as plain:
        try:
            with run_broker(
                "mosquitto",
                plain.root / "capped",
                settings=("allow_anonymous true", f"max_packet_size {_CAP}"),
            ) as broker:
                capped = Site(plain.root, broker)
                config, topics = capped.config(cameras=[camera], boot_seconds=0.2, fps=2.0)
                chunked = capped.run_agent(
                    config, topics, partial(_chunked, options, capped), cameras=[camera]
                )
        except BrokerUnavailable as exc:
            raise BenchError(f"cannot start a capped mosquitto: {exc}") from exc
        config, topics = plain.config(cameras=[camera], boot_seconds=0.2, fps=2.0)
        inline = plain.run_agent(
            config, topics, partial(_inline, options, plain, camera=camera), cameras=[camera]
        )
    size = options.size * _MB / 1e6  # MB as the table prints them
    c, i = median([r[0] for r in chunked]), median(inline)
    rows = [
        Row(
            f"{options.size} MiB model to the agent, p50",
            f"{c:.2f} s chunked (128 KiB cap)",
            f"{i:.2f} s inline (no cap)",
            f"{c / i:.1f}x",
        ),
        Row("  throughput, p50", f"{size / c:.1f} MB/s", f"{size / i:.1f} MB/s"),
        Row("  chunks sent per rep", f"{chunked[0][1]} ({chunked[0][2]} bytes)", "1 message"),
        Row(
            "  slowest rep",
            f"{max(r[0] for r in chunked):.2f} s",
            f"{max(inline):.2f} s",
        ),
    ]
    chunk = _chunk_size(options, topics.chunk("0" * 64, options.size * _MB))
    notes = [
        f"{options.reps} reps each, a new model every rep; chunks of {chunk} bytes, "
        f"{options.window} in flight, QoS 1",
        "chunked: manifest -> retained status `stored` (every chunk journaled and fsynced, "
        "hashed, parsed); inline: publish -> `accepted` (stored, parsed, state written)",
    ]
    return Table("chunked: a large model through a capped broker", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("chunked", measure, Options, __doc__))
