"""A plain chunked-upload sender for the tests, written from the README's protocol alone."""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    import aiomqtt

    from agent.topics import Topics

__all__ = ["KIB", "chunks", "padded_model", "send_chunks", "send_manifest"]

KIB = 1024


def padded_model(blob: Path, size: int, seed: int = 7) -> bytes:
    """A real blob followed by random bytes up to `size`: depthai parses it like the blob."""
    data = blob.read_bytes()
    rng = random.Random(seed)  # noqa: S311  # test data, not secrets
    return data + rng.randbytes(size - len(data)) if size > len(data) else data


def chunks(
    size: int, chunk_size: int, missing: Iterable[tuple[int, int]] | None = None
) -> list[int]:
    """The offsets of the chunks to send: all, or those overlapping the `missing` ranges."""
    offsets = range(0, size, chunk_size)
    if missing is None:
        return list(offsets)
    ranges = list(missing)
    return [o for o in offsets if any(start < o + chunk_size and o < end for start, end in ranges)]


async def send_manifest(
    client: aiomqtt.Client, topics: Topics, data: bytes, chunk_size: int, **extra: Any
) -> str:
    sha256 = hashlib.sha256(data).hexdigest()
    manifest = {"size": len(data), "chunk_size": chunk_size, **extra}
    await client.publish(topics.upload(sha256), msgspec.json.encode(manifest), qos=1)
    return sha256


async def send_chunks(
    client: aiomqtt.Client,
    topics: Topics,
    data: bytes,
    chunk_size: int,
    offsets: Iterable[int],
) -> None:
    sha256 = hashlib.sha256(data).hexdigest()
    for offset in offsets:
        chunk = data[offset : offset + chunk_size]
        await client.publish(topics.chunk(sha256, offset), chunk, qos=1)
