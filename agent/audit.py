"""The audit log: one JSON line per command received, and one when its request ends.

`{state_dir}/audit/audit.jsonl`, rotated by size into `audit.jsonl.1` (newest) …
`audit.jsonl.5` (oldest). Lines are taken without blocking (`AuditLog.record`) into a
bounded queue and written by one task through a thread, a burst's lines together (a line
waits up to 5 ms for them), each with its own `write` (flushed to the OS, not fsynced). A
write that fails is reported once per spell (the `on_failure` callback: `{base}/errors`),
the lines it could not write are counted and logged, and writing resumes with the next line
once the folder takes it again. Commands never wait for it. No transport here: the command
boundary and the coordinator call it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections import deque
from typing import TYPE_CHECKING, Final, Literal

import anyio
import msgspec
import structlog

from agent.errors import AuditWriteFailed, ErrorInfo, clip
from agent.signing import UNSIGNED
from agent.state import make_private_folder

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from anyio.abc import TaskStatus

    from agent.errors import AgentError
    from agent.messages import Event
    from agent.signing import Authenticity

__all__ = [
    "AUDIT_FILE",
    "DEFAULT_MAX_BYTES",
    "KEEP",
    "AuditLine",
    "AuditLog",
    "Received",
    "audit_files",
    "outcome_line",
]

log = structlog.get_logger(__name__)

AUDIT_FILE: Final = "audit.jsonl"
DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
KEEP: Final = 5  # rotated files kept: audit.jsonl.1 … audit.jsonl.5
_QUEUE: Final = 4096  # lines waiting for the writer; more are dropped (counted)
_BATCH: Final = 256  # lines per thread hop
_DRAIN_SECONDS: Final = 2.0  # for the lines still queued at shutdown
_LINGER_SECONDS: Final = 0.005  # a line waits this long for others to share its thread hop
_TEXT: Final = 256  # untrusted strings (topic, camera, …) are cut to this many characters
_FILE_MODE: Final = 0o600
_HASH_IN_THREAD_ABOVE: Final = 1024 * 1024  # payload bytes hashed off the event loop

Kind = Literal["received", "outcome"]


class AuditLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the audit log; every field is written, null when not known.

    `received` lines: `state` is `submitted` (an `outcome` line follows when the request
    ends), `replayed` (answered from the record; `replayed_state` is what was replayed),
    `rejected` (final: no other line follows), or for a simulator fault knob `executed` /
    `ignored`. `outcome` lines: `succeeded`, `failed`, `superseded` or `rejected` (refused
    after it was submitted: the state write failed, or the agent stopped).
    """

    ts: float
    kind: Kind
    topic: str
    action: str
    camera: str
    stream: str | None = None
    request_id: str | None = None
    key_id: str | None = None
    signed: bool | None = None  # None: not known (an outcome after a restart)
    payload_sha256: str | None = None
    payload_bytes: int | None = None
    model_sha256: str | None = None
    state: str | None = None
    error: ErrorInfo | None = None
    superseded_by: str | None = None
    replayed_state: str | None = None

    def clipped(self) -> AuditLine:
        """This line with untrusted strings cut to a bounded length."""
        return msgspec.structs.replace(
            self,
            topic=clip(self.topic, _TEXT),
            action=clip(self.action, _TEXT),
            camera=clip(self.camera, _TEXT),
            stream=None if self.stream is None else clip(self.stream, _TEXT),
            request_id=None if self.request_id is None else clip(self.request_id, _TEXT),
        )


def outcome_line(
    event: Event,
    *,
    topic: str,
    authenticity: Authenticity | None,
    model_sha256: str | None,
) -> AuditLine:
    """The `outcome` line of a request's terminal event."""
    return AuditLine(
        ts=event.ts,
        kind="outcome",
        topic=topic,
        action=event.action,
        camera=event.camera,
        stream=event.stream,
        request_id=event.request_id,
        key_id=None if authenticity is None else authenticity.key_id,
        signed=None if authenticity is None else authenticity.signed,
        model_sha256=model_sha256,
        state=event.state,
        error=event.error,
        superseded_by=event.superseded_by,
    )


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class Received:
    """One command received: its `received` line, filled in while the command is handled
    and recorded once its payload is hashed; later, maybe an `outcome` line of its own."""

    def __init__(
        self,
        log: AuditLog,
        *,
        topic: str,
        action: str,
        camera: str,
        stream: str | None,
        payload_bytes: int,
        authenticity: Authenticity,
    ) -> None:
        self._log = log
        self.ts = time.time()  # when its handling began
        self.topic = topic
        self.action = action
        self.camera = camera
        self.stream = stream
        self.payload_bytes = payload_bytes
        self.authenticity = authenticity
        self.request_id: str | None = None
        self.model_sha256: str | None = None
        self._payload_sha256: str | None = None
        self._hashed = anyio.Event()

    async def hash(self, payload: bytes) -> None:
        """Hash the payload: in a thread when it is large (hashlib lets go of the GIL)."""
        if len(payload) > _HASH_IN_THREAD_ABOVE:
            self._payload_sha256 = await anyio.to_thread.run_sync(_sha256, payload)
        else:
            self._payload_sha256 = _sha256(payload)
        self._hashed.set()

    def hash_now(self, payload: bytes) -> None:
        self._payload_sha256 = _sha256(payload)
        self._hashed.set()

    async def hashed(self) -> None:
        """Return once the payload is hashed (see `hash`)."""
        await self._hashed.wait()

    async def record(
        self, state: str, *, error: ErrorInfo | None = None, replayed_state: str | None = None
    ) -> None:
        """Record the `received` line once the payload is hashed."""
        await self._hashed.wait()
        self.record_now(state, error=error, replayed_state=replayed_state)

    def record_now(
        self, state: str, *, error: ErrorInfo | None = None, replayed_state: str | None = None
    ) -> None:
        """Record the `received` line; the payload is hashed already (`hash_now`)."""
        self._log.record(
            AuditLine(
                ts=self.ts,
                kind="received",
                topic=self.topic,
                action=self.action,
                camera=self.camera,
                stream=self.stream,
                request_id=self.request_id,
                key_id=self.authenticity.key_id,
                signed=self.authenticity.signed,
                payload_sha256=self._payload_sha256,
                payload_bytes=self.payload_bytes,
                model_sha256=self.model_sha256,
                state=state,
                error=error,
                replayed_state=replayed_state,
            )
        )

    def outcome(self, event: Event) -> None:
        """Record the `outcome` line of its request (refused after it was submitted)."""
        line = outcome_line(
            event, topic=self.topic, authenticity=self.authenticity, model_sha256=self.model_sha256
        )
        self._log.record(line)


def audit_files(folder: Path, keep: int = KEEP) -> list[Path]:
    """The audit files in `folder`, oldest first (those that may exist)."""
    rotated = [folder / f"{AUDIT_FILE}.{n}" for n in range(keep, 0, -1)]
    return [*rotated, folder / AUDIT_FILE]


_encoder: Final = msgspec.json.Encoder()


class _AuditFile:
    """The current audit file, appended to and rotated by size; used from one thread."""

    def __init__(self, folder: Path, max_bytes: int, keep: int) -> None:
        self.folder = folder
        self.path = folder / AUDIT_FILE
        self._max_bytes = max_bytes
        self._keep = keep
        self._fd: int | None = None
        self._size = 0

    def append(self, lines: list[AuditLine]) -> tuple[int, str | None]:
        """Write `lines`; how many were written, and why the rest were not (or None)."""
        written = 0
        try:
            for line in lines:
                self._write(_encoder.encode(line.clipped()) + b"\n")
                written += 1
        except OSError as exc:
            self.close()
            return written, f"cannot write {self.path}: {exc.strerror or exc}"
        return written, None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        fd = self._open()
        if self._size and self._size + len(data) > self._max_bytes:
            fd = self._rotate()
        view = memoryview(data)
        while view:  # one line per write; a short write (disk full) writes the rest or raises
            done = os.write(fd, view)
            if done == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[done:]
            self._size += done

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        make_private_folder(self.folder)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC  # read: the last byte
        fd = os.open(self.path, flags, _FILE_MODE)
        try:
            info = os.fstat(fd)
            if stat.S_IMODE(info.st_mode) != _FILE_MODE:  # the umask, or an older file
                os.fchmod(fd, _FILE_MODE)
            self._size = info.st_size
            if self._size and os.pread(fd, 1, self._size - 1) != b"\n":
                # a line a crash cut off: the next line starts on a line of its own
                self._size += os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def _rotate(self) -> int:
        """audit.jsonl -> .1 -> .2 … -> .keep (the oldest is dropped); a fresh audit.jsonl."""
        self.close()
        for n in range(self._keep - 1, 0, -1):
            older = self.folder / f"{AUDIT_FILE}.{n}"
            with contextlib.suppress(FileNotFoundError):
                older.replace(self.folder / f"{AUDIT_FILE}.{n + 1}")
        self.path.replace(self.folder / f"{AUDIT_FILE}.1")
        return self._open()


class AuditLog:
    """Takes audit lines without blocking; one writer task puts them on disk."""

    def __init__(
        self,
        folder: Path,
        *,
        on_failure: Callable[[AgentError], None],
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = KEEP,
        enabled: bool = True,
        queue_size: int = _QUEUE,
    ) -> None:
        self.enabled = enabled
        self._file = _AuditFile(folder, max_bytes, keep)
        self._on_failure = on_failure
        self._queue: deque[AuditLine] = deque()
        self._queue_size = queue_size
        self._queued = anyio.Event()
        self.written = 0
        self.lost = 0  # lines that could not be written, or found the queue full
        self._recorded = 0  # lines offered to `record`
        self._progress = anyio.Event()  # set after each write
        self._failing = False
        self._full = False

    @property
    def path(self) -> Path:
        return self._file.path

    def received(
        self,
        *,
        topic: str,
        action: str,
        camera: str,
        stream: str | None,
        payload_bytes: int,
        authenticity: Authenticity = UNSIGNED,
    ) -> Received | None:
        """The audit record of one command received; None when the log is turned off."""
        if not self.enabled:
            return None
        return Received(
            self,
            topic=topic,
            action=action,
            camera=camera,
            stream=stream,
            payload_bytes=payload_bytes,
            authenticity=authenticity,
        )

    def record(self, line: AuditLine) -> None:
        """Queue a line for the writer; never blocks (a full queue drops it, counted)."""
        if not self.enabled:
            return
        self._recorded += 1
        if len(self._queue) >= self._queue_size:
            self.lost += 1
            if not self._full:  # once per spell
                log.warning("audit queue full, lines dropped", path=str(self.path))
                self._full = True
            return
        self._queue.append(line)
        self._queued.set()

    async def flushed(self) -> None:
        """Return once every line recorded so far is written, or counted as lost."""
        recorded = self._recorded
        while self.written + self.lost < recorded:
            await self._progress.wait()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Write lines while the body runs; at exit, write what is queued (time-bounded)."""
        if not self.enabled:
            yield
            return
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self._writer, name="audit.writer")
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            # the lines recorded while the agent stopped (refusals, the last answers)
            with anyio.move_on_after(_DRAIN_SECONDS, shield=True):
                while batch := self._take():
                    await self._write(batch)
                await anyio.to_thread.run_sync(self._file.close)
            self.lost += len(self._queue)  # not written in time
            self._queue.clear()
            if self.lost:
                log.warning("audit lines lost", lost=self.lost, written=self.written)

    async def _writer(self, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        while True:
            while not self._queue:
                self._queued = anyio.Event()
                await self._queued.wait()
            # the lines of a burst of commands come a few at a time: one thread hop for
            # those that arrive meanwhile (a hop costs ~100 µs of CPU, a line ~10 µs)
            await anyio.sleep(_LINGER_SECONDS)
            while self._queue:
                await self._write(self._take())

    def _take(self) -> list[AuditLine]:
        batch: list[AuditLine] = []
        while self._queue and len(batch) < _BATCH:
            batch.append(self._queue.popleft())
        return batch

    async def _write(self, batch: list[AuditLine]) -> None:
        # shielded: a batch taken from the queue is written, even when cancelled meanwhile
        with anyio.CancelScope(shield=True):
            written, problem = await anyio.to_thread.run_sync(self._file.append, batch)
        self.written += written
        self.lost += len(batch) - written
        self._progress.set()
        self._progress = anyio.Event()
        if self._full and written:
            self._full = False
        if problem is None:
            if self._failing:
                log.info("audit log written again", path=str(self.path), lost=self.lost)
                self._failing = False
            return
        if self._failing:
            log.debug("audit lines not written", count=len(batch) - written, lost=self.lost)
            return
        self._failing = True  # reported once per spell; its recovery only in the log
        log.error("audit write failed", error=problem, lost=self.lost)
        self._on_failure(
            AuditWriteFailed(
                f"{problem}; commands are still handled, their audit lines are lost "
                "(counted in the agent's log) until it can be written"
            )
        )
