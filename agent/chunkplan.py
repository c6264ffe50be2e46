"""The sender's arithmetic of a chunked model upload: pure functions, no I/O.

What fits in one MQTT packet, which chunk size a capped broker allows, which chunks cover the
byte ranges an agent reports missing, and the manifest that announces an upload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "chunk_length",
    "chunk_size_for",
    "chunks_to_send",
    "has_range",
    "manifest",
    "missing_bytes",
    "publish_packet_size",
]

MIN_CHUNK_SIZE: Final = 4096
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
"""Chunk size when the broker names no limit: large enough to be fast, small enough to resume."""

_MAX_REMAINING_LENGTH: Final = 268_435_455  # MQTT's own bound on a packet's remaining length


def _varint_length(value: int) -> int:
    """Bytes of MQTT's variable byte integer for `value`."""
    length = 1
    while value >= 128:
        value //= 128
        length += 1
    return length


def publish_packet_size(topic: str, payload: int, *, mqtt5: bool) -> int:
    """Bytes of a QoS 1 PUBLISH of `payload` bytes to `topic`, without properties."""
    remaining = 2 + len(topic.encode()) + 2 + (1 if mqtt5 else 0) + payload
    return 1 + _varint_length(remaining) + remaining


def chunk_size_for(
    max_packet: int | None, topic: str, *, mqtt5: bool, limit: int = DEFAULT_CHUNK_SIZE
) -> int:
    """The largest multiple of 4 KiB, at most `limit`, whose chunk to `topic` fits `max_packet`.

    `topic` should be the longest chunk topic of the upload (the last offset has the most
    digits). Raises ValueError when not even 4 KiB fits.
    """
    room = _MAX_REMAINING_LENGTH if max_packet is None else max_packet
    # the largest payload p with publish_packet_size(topic, p) <= room
    payload = room - publish_packet_size(topic, 0, mqtt5=mqtt5)
    while payload > 0 and publish_packet_size(topic, payload, mqtt5=mqtt5) > room:
        payload -= 1
    size = min(payload, limit) // MIN_CHUNK_SIZE * MIN_CHUNK_SIZE
    if size < MIN_CHUNK_SIZE:
        raise ValueError(
            f"a packet of {max_packet} bytes cannot carry a chunk of {MIN_CHUNK_SIZE} bytes"
        )
    return size


def chunk_length(offset: int, size: int, chunk_size: int) -> int:
    """Bytes of the chunk at `offset` of a `size`-byte model."""
    return min(chunk_size, size - offset)


def chunks_to_send(size: int, chunk_size: int, missing: Iterable[tuple[int, int]]) -> list[int]:
    """Offsets, ascending and once each, of the chunks that cover the [start, end) ranges."""
    offsets: set[int] = set()
    for low, high in missing:
        start, end = max(low, 0), min(high, size)
        if start >= end:
            continue
        first, last = start // chunk_size, (end - 1) // chunk_size
        offsets.update(index * chunk_size for index in range(first, last + 1))
    return sorted(offsets)


def has_range(
    offset: int, length: int, missing: Iterable[tuple[int, int]], *, truncated: bool
) -> bool:
    """Whether a status with these `missing` ranges says the agent has [offset, offset+length).

    A truncated list names only the first ranges: beyond its last one nothing is known.
    """
    end = offset + length
    last = 0
    for start, stop in missing:
        if start < stop and start < end and offset < stop:
            return False
        last = max(last, stop)
    return not (truncated and end > last)


def missing_bytes(missing: Iterable[tuple[int, int]]) -> int:
    """Bytes in the [start, end) ranges (they do not overlap)."""
    return sum(max(0, end - start) for start, end in missing)


def manifest(
    size: int,
    chunk_size: int,
    *,
    request_id: str | None = None,
    model_name: str | None = None,
    expires_at: float | None = None,
) -> bytes:
    """The JSON manifest published on `{base}/models/{sha256}/upload`."""
    if size < 1:
        raise ValueError("a model has at least one byte")
    if chunk_size < MIN_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be at least {MIN_CHUNK_SIZE}")
    body: dict[str, Any] = {"size": size, "chunk_size": chunk_size}
    if request_id is not None:
        body["request_id"] = request_id
    if model_name is not None:
        body["model_name"] = model_name
    if expires_at is not None:
        body["expires_at"] = expires_at
    return msgspec.json.encode(body)
