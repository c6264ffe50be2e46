"""The operator's side of a chunked model upload, over one connected aiomqtt client.

`send_model` announces the model with its manifest, reads the agent's answer on
`{base}/models/{sha256}/status` and sends only the chunks covering the ranges it reports
missing (on a resume, once the agent has gone idle: chunks an interrupted run left at the
broker may still be reaching it), at most `window` QoS 1 chunks in flight (each read from
the file when it goes, so memory stays bounded). It repeats the manifest when the agent
goes quiet without a final answer, and returns once the status says `stored` or `failed`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio
import msgspec

from agent.chunkplan import chunk_length, chunks_to_send, has_range, manifest, missing_bytes
from agent.messages import UploadStatus
from agent.mqtt import payload_bytes

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import aiomqtt

    from agent.topics import Topics

__all__ = ["DEFAULT_WINDOW", "ModelFile", "Sent", "decode_status", "send_model", "sha256_of"]

DEFAULT_WINDOW: Final = 8
_QUIET: Final = 3.0  # seconds without a status after which the manifest is sent again
_IDLE: Final = 3.0  # seconds without a status: the agent took every chunk it had (it says
# how far it is at most every 0.5 s while chunks arrive; an fsync under load can take longer)
_MAX_ROUNDS: Final = 100
_READ_BLOCK: Final = 1024 * 1024

_status_decoder: Final = msgspec.json.Decoder(UploadStatus)


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A model on disk, as the upload names it."""

    path: Path
    sha256: str
    size: int


def sha256_of(path: Path) -> ModelFile:
    """Hash `path` in blocks; OSError when it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while block := file.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    return ModelFile(path=path, sha256=digest.hexdigest(), size=size)


@dataclass(slots=True)
class Sent:
    """What an upload came to: the last status and what this sender published."""

    status: UploadStatus | None = None
    chunks: int = 0
    bytes: int = 0
    rounds: int = 0


def decode_status(payload: bytes) -> UploadStatus | None:
    """The upload status in `payload`; None for anything else (never raises)."""
    try:
        return _status_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


async def send_model(
    client: aiomqtt.Client,
    topics: Topics,
    model: ModelFile,
    *,
    chunk_size: int,
    progress: Callable[[int, int], None],
    request_id: str | None = None,
    model_name: str | None = None,
    window: int = DEFAULT_WINDOW,
    publish_timeout: float = 30.0,
) -> Sent:
    """Upload `model` until the agent's status is `stored` or `failed` (see the module doc).

    The caller bounds the time; aiomqtt.MqttError when the connection is lost.
    """
    status_topic = topics.upload_status(model.sha256)
    announce = manifest(model.size, chunk_size, request_id=request_id, model_name=model_name)
    latest = _Latest()
    fd = os.open(model.path, os.O_RDONLY)
    upload = _Upload(
        latest=latest,
        client=client,
        topics=topics,
        model=model,
        chunk_size=chunk_size,
        fd=fd,
        progress=progress,
        window=window,
        timeout=publish_timeout,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(latest.follow, client, status_topic)
            await client.subscribe(status_topic, qos=1)
            for _ in range(_MAX_ROUNDS):
                upload.sent.rounds += 1
                seen = latest.count
                await client.publish(
                    topics.upload(model.sha256), announce, qos=1, timeout=publish_timeout
                )
                status = await latest.next(after=seen, settle=False)
                if status is None:
                    continue  # no answer: announce again
                if status.state == "receiving" and status.received:
                    # a resume: chunks an earlier run left at the broker may still be reaching
                    # the agent; its list of what is missing holds once it goes idle
                    status = (
                        await latest.next(after=latest.count, settle=True, quiet=_IDLE) or status
                    )
                if status.state == "receiving":
                    if status.missing:
                        await upload.send_missing(status)
                    # the final answer, or the agent's latest word once it goes quiet
                    status = await latest.next(after=seen, settle=True) or status
                upload.sent.status = status
                if status.state != "receiving":
                    break
                # quiet with bytes missing (or still checking): announce again; the answer
                # is the agent's current view
            tg.cancel_scope.cancel()
    finally:
        os.close(fd)
    return upload.sent


class _Latest:
    """The latest live status of one upload, and how many have come."""

    def __init__(self) -> None:
        self.status: UploadStatus | None = None
        self.count = 0
        self._changed = anyio.Event()

    async def follow(self, client: aiomqtt.Client, topic: str) -> None:
        """Keep the latest live status; retained ones predate this sender."""
        async for message in client.messages:
            if message.retain or not message.topic.matches(topic):
                continue
            status = decode_status(payload_bytes(message))
            if status is not None:
                self.status = status
                self.count += 1
                self._changed.set()
                self._changed = anyio.Event()

    async def next(self, *, after: int, settle: bool, quiet: float = _QUIET) -> UploadStatus | None:
        """The first status after the `after`-th (settle: the final one, or the latest once
        the agent has been quiet for `quiet` seconds); None when none came meanwhile."""
        while True:
            changed = self._changed
            status = self.status if self.count > after else None
            if status is not None and (not settle or status.state != "receiving"):
                return status
            with anyio.move_on_after(quiet):
                await changed.wait()
                continue
            return status


@dataclass(slots=True, kw_only=True)
class _Upload:
    """Publishes chunks of one model file, at most `window` unacknowledged."""

    latest: _Latest
    client: aiomqtt.Client
    topics: Topics
    model: ModelFile
    chunk_size: int
    fd: int
    progress: Callable[[int, int], None]
    window: int
    timeout: float
    sent: Sent = field(default_factory=Sent)
    _done: int = 0

    async def send_missing(self, status: UploadStatus) -> None:
        """Publish the chunks that cover `status.missing`."""
        size = self.model.size
        offsets = chunks_to_send(size, self.chunk_size, status.missing)
        self._done = size - missing_bytes(status.missing)
        self.progress(self._done, size)
        slots = anyio.Semaphore(self.window)
        planned = self.latest.count
        async with anyio.create_task_group() as tg:
            for offset in offsets:
                await slots.acquire()
                if self._arrived(offset, since=planned):
                    slots.release()
                    continue
                tg.start_soon(self._send, offset, slots)

    def _arrived(self, offset: int, *, since: int) -> bool:
        """Whether a status newer than the plan says the agent has this chunk by now (from a
        run that was interrupted: its chunks may still have been on their way)."""
        status = self.latest.status
        if status is None or self.latest.count <= since:
            return False
        length = chunk_length(offset, self.model.size, self.chunk_size)
        if not has_range(offset, length, status.missing, truncated=status.missing_truncated):
            return False
        self._done = min(self.model.size, self._done + length)
        self.progress(self._done, self.model.size)
        return True

    async def _send(self, offset: int, slots: anyio.Semaphore) -> None:
        size = self.model.size
        try:
            data = os.pread(self.fd, chunk_length(offset, size, self.chunk_size), offset)
            topic = self.topics.chunk(self.model.sha256, offset)
            await self.client.publish(topic, data, qos=1, timeout=self.timeout)
        finally:
            slots.release()
        self.sent.chunks += 1
        self.sent.bytes += len(data)
        self._done = min(size, self._done + len(data))
        self.progress(self._done, size)
