"""Chunked model uploads over MQTT: resumable partial files, content-addressed results.

`{base}/models/{sha256}/upload` (a manifest) and `.../chunks/{offset}` (raw bytes) come here
straight from the link (`Uploads.receive`), not through the command intake, so chunks never
wait in, or hold up, a camera's command lane. One task writes chunks in arrival order; a
second one makes them durable in groups; hashing and parsing a finished model runs in its
own task, at most two at once; none of them holds up another camera's commands.

On disk, in `{state_dir}/uploads/`, per upload in progress:
- `<sha256>.manifest`: the manifest, written atomically (temp, fsync, rename) first;
- `<sha256>.part`: the model's bytes at their offsets (pwrite);
- `<sha256>.chunks`: a journal of the chunks whose bytes are durable, 8-byte records
  (chunk index, crc32 of it), appended only after an fdatasync of `.part`, then fsynced.
A chunk is counted as received, shown in the status and acknowledged (PUBACK) only once its
record is fsynced, so the status never claims what a crash could lose. A crash loses at most
chunks not journaled yet: they are missing after the restart and sent again; a torn record
fails its crc and is cut off there. Chunks that arrive while one sync runs share the next
(one fdatasync and one fsync per upload and group).

A manifest is checked against `[security]` like a command (`agent.signing.Policy`: signed by
a key for every camera, or unsigned when signatures are not required) before anything is
written; chunks are unsigned, taken only for an upload whose manifest was accepted, and
covered by the sha256 it names.

A finished upload is hashed; a mismatch fails it (`checksum_mismatch`, partial deleted);
else the store parses it with depthai and renames it in (`agent.models.ModelStore.put_file`).
The retained status goes out at most every 0.5 s while receiving, at once when the upload
ends, and is cleared (an empty retained message) `models.status_retention` seconds later.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio
import msgspec
import structlog

from agent.errors import (
    AgentError,
    ChecksumMismatch,
    Expired,
    Internal,
    InvalidChunk,
    InvalidPayload,
    ModelNotFound,
    RetainedCommand,
    StateWriteFailed,
    StorageFull,
    UploadNotFound,
    UploadTimeout,
    error_info,
)
from agent.messages import (
    ModelEntry,
    UploadManifest,
    UploadStatus,
    decode_manifest,
)
from agent.signing import Policy, find_signature
from agent.state import make_private_folder
from agent.topics import SHA256_RE

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from anyio.abc import TaskGroup, TaskStatus

    from agent.config import ModelsSection
    from agent.errors import ErrorInfo
    from agent.inbox import Inbound, Receipt
    from agent.models import ModelStore, StoredModel
    from agent.reporter import Reporter
    from agent.topics import Topics, UploadTopic
    from agent.vocab import UploadStateName

__all__ = ["MAX_MISSING_RANGES", "MAX_UPLOADS", "Uploads"]

log = structlog.get_logger(__name__)

MAX_MISSING_RANGES: Final = 64
"""Ranges listed in a status's `missing`; beyond them `missing_truncated` is true."""

MAX_UPLOADS: Final = 16
"""Uploads in progress at once (each holds two open files)."""

_STATUS_EVERY: Final = 0.5  # seconds between two status publications of one upload
_TICK: Final = 0.25
_MODELS_EVERY: Final = 1.0  # seconds between two publications of the `{base}/models` list
_MAX_FINISHED: Final = 256  # ended uploads whose retained status waits to be cleared
_HASHING: Final = 2  # finished uploads hashed and parsed at once
_RECORD: Final = struct.Struct("<II")  # chunk index, crc32 of the packed index
_HASH_BLOCK: Final = 1 << 20
_TMP_PREFIX: Final = ".manifest-"
_TMP_SUFFIX: Final = ".tmp"

_manifest_encoder: Final = msgspec.json.Encoder()
_manifest_decoder: Final = msgspec.json.Decoder(UploadManifest)


def _record(index: int) -> bytes:
    packed = index.to_bytes(4, "little")
    return _RECORD.pack(index, zlib.crc32(packed))


def _read_journal(raw: bytes, count: int) -> tuple[list[int], int]:
    """The chunk indices of the valid records, and the length of the valid prefix."""
    indices: list[int] = []
    end = len(raw) - len(raw) % _RECORD.size
    for offset in range(0, end, _RECORD.size):
        index, crc = _RECORD.unpack_from(raw, offset)
        if index >= count or crc != zlib.crc32(index.to_bytes(4, "little")):
            return indices, offset  # torn or garbage: nothing after it is trusted
        indices.append(index)
    return indices, end


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(eq=False, slots=True)
class _Upload:
    """One upload in progress: its manifest, files, and the chunks durable so far."""

    sha256: str
    manifest: UploadManifest
    folder: Path
    have: bytearray  # one byte per chunk: 1 once durable
    last_progress: float  # wall clock: survives a restart through the files' mtimes
    received: int = 0  # durable bytes
    data_fd: int | None = None
    journal_fd: int | None = None
    # written, not durable yet: chunk index -> receipts to settle once it is
    pending: dict[int, list[Receipt]] = field(default_factory=dict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)  # file operations
    finishing: bool = False  # every chunk is durable: being hashed and stored
    error: ErrorInfo | None = None  # the last message refused for it
    dirty: bool = True  # the status changed since it was published
    published_at: float = 0.0  # monotonic
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: StoredModel | AgentError | None = None
    watchers: list[Callable[[int, int | None], None]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    def length(self, index: int) -> int:
        """The length chunk `index` must have."""
        start = index * self.chunk_size
        return min(self.chunk_size, self.size - start)

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.sha256}{suffix}"

    def missing(self) -> tuple[tuple[tuple[int, int], ...], bool]:
        """The byte ranges not durable yet, at most MAX_MISSING_RANGES; and whether cut."""
        ranges: list[tuple[int, int]] = []
        have, count = self.have, len(self.have)
        index = have.find(0)
        while index >= 0:
            if len(ranges) == MAX_MISSING_RANGES:
                return tuple(ranges), True
            end = have.find(1, index)
            end = count if end < 0 else end
            ranges.append((index * self.chunk_size, min(end * self.chunk_size, self.size)))
            index = have.find(0, end) if end < count else -1
        return tuple(ranges), False

    def status(self) -> UploadStatus:
        missing, truncated = self.missing()
        return UploadStatus(
            state="receiving",
            size=self.size,
            received=self.received,
            missing=missing,
            missing_truncated=truncated,
            chunk_size=self.chunk_size,
            updated_at=time.time(),
            request_id=self.manifest.request_id,
            error=self.error,
        )

    def close(self) -> None:
        for fd in (self.data_fd, self.journal_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.data_fd = self.journal_fd = None


@dataclass(eq=False, slots=True)
class _Ended:
    """The final status of an upload (or a refusal with no upload), still retained."""

    clear_at: float  # monotonic: then cleared
    published_at: float  # monotonic
    deferred: UploadStatus | None = None  # a newer one, published by the tick


@dataclass(eq=False, slots=True)
class _Item:
    message: Inbound
    receipt: Receipt
    topic: UploadTopic


class Uploads:
    """Every chunked upload of one agent: receives, persists, verifies and stores them."""

    def __init__(
        self,
        folder: Path,
        *,
        topics: Topics,
        store: ModelStore,
        reporter: Reporter,
        settings: ModelsSection,
        max_chunk_bytes: int,
        policy: Policy | None = None,
    ) -> None:
        self.folder = folder
        self._policy = policy if policy is not None else Policy()
        self._topics = topics
        self._store = store
        self._reporter = reporter
        self._settings = settings
        self._max_chunk = max_chunk_bytes
        self._uploads: dict[str, _Upload] = {}
        # ended uploads (and refusals without an upload), whose status is still retained
        self._finished: dict[str, _Ended] = {}
        self._inbox: deque[_Item] = deque()
        self._arrived = anyio.Event()
        self._sync_wanted = anyio.Event()
        self._hashing = anyio.CapacityLimiter(_HASHING)
        self._task_group: TaskGroup | None = None
        self._stopping = False
        self._in_use: Callable[[], dict[str, list[str]]] = dict
        self._kept: Callable[[], dict[str, list[str]]] = dict
        self._models_changed = True
        self._models_published: tuple[ModelEntry, ...] | None = None
        self._models_at = 0.0
        self._last_use: tuple[dict[str, list[str]], dict[str, list[str]]] = ({}, {})
        store.on_change(self._store_changed)

    # --- for the rest of the agent ---------------------------------------------------------

    def models_in_use(
        self,
        in_use: Callable[[], dict[str, list[str]]],
        kept: Callable[[], dict[str, list[str]]] = dict,
    ) -> None:
        """Name what runs each model and what ran it before its current one (each sha256 ->
        ["mxid/stream"]), for the `{base}/models` list."""
        self._in_use, self._kept = in_use, kept

    def in_progress(self, sha256: str) -> bool:
        return sha256 in self._uploads

    async def wait(self, sha256: str, progress: Callable[[int, int | None], None]) -> StoredModel:
        """The model once its upload is stored; raise the upload's error if it fails.

        `progress(received, total)` is called now and whenever more of it is durable.
        """
        while True:
            upload = self._uploads.get(sha256)
            if upload is None:  # stored meanwhile, or never was
                return await self._store.get(sha256)
            upload.watchers.append(progress)
            progress(upload.received, upload.size)
            try:
                await upload.done.wait()
            finally:
                upload.watchers.remove(progress)
            outcome = upload.outcome
            if isinstance(outcome, AgentError):
                raise outcome
            if outcome is not None:
                return outcome
            # started again (another chunk_size): wait for the new one

    def owns(self, topic: str) -> bool:
        return self._topics.parse_upload(topic) is not None

    def receive(self, message: Inbound, receipt: Receipt) -> None:
        """Take a manifest or a chunk in (never blocks); handled in arrival order."""
        topic = self._topics.parse_upload(message.topic)
        if topic is None or self._stopping:  # unacknowledged: the broker sends it again
            receipt.release()
            return
        self._inbox.append(_Item(message, receipt, topic))
        self._arrived.set()

    # --- start-up --------------------------------------------------------------------------

    def load(self) -> None:
        """Take over the uploads a previous run left; drop what cannot be resumed."""
        try:
            make_private_folder(self.folder.parent)  # the state folder: private too
            make_private_folder(self.folder)
            for leftover in self.folder.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                leftover.unlink()
            for path in sorted(self.folder.glob("*.manifest")):
                self._resume(path)
            for path in (*self.folder.glob("*.part"), *self.folder.glob("*.chunks")):
                if path.stem not in self._uploads:
                    path.unlink()
                    log.info("partial upload without a manifest removed", path=str(path))
        except OSError as exc:
            log.warning("upload folder not usable", path=str(self.folder), error=str(exc))

    def _resume(self, path: Path) -> None:
        sha256 = path.stem
        part, journal = path.with_suffix(".part"), path.with_suffix(".chunks")
        try:
            manifest = _manifest_decoder.decode(path.read_bytes())
        except (OSError, msgspec.MsgspecError) as exc:
            log.warning("unreadable upload manifest removed", path=str(path), error=str(exc))
            _unlink(path, part, journal)
            return
        if not SHA256_RE.fullmatch(sha256) or self._store.exists(sha256):
            _unlink(path, part, journal)  # stored already (a crash after the rename)
            return
        upload = self._new(sha256, manifest)
        data_fd, journal_fd = self._open(upload)
        raw = journal.read_bytes()
        indices, valid = _read_journal(raw, len(upload.have))
        if valid < len(raw):
            os.ftruncate(journal_fd, valid)
            log.warning("upload journal cut at a torn record", sha256=sha256, kept=valid)
        data_size = os.fstat(data_fd).st_size
        for index in indices:
            end = index * upload.chunk_size + upload.length(index)
            if not upload.have[index] and end <= data_size:  # journaled after its data
                upload.have[index] = 1
                upload.received += upload.length(index)
        upload.last_progress = max(p.stat().st_mtime for p in (path, journal))
        self._uploads[sha256] = upload
        log.info("upload resumed", sha256=sha256, size=upload.size, received=upload.received)

    def _new(self, sha256: str, manifest: UploadManifest) -> _Upload:
        count = -(-manifest.size // manifest.chunk_size)
        return _Upload(sha256, manifest, self.folder, bytearray(count), time.time())

    def _open(self, upload: _Upload) -> tuple[int, int]:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        upload.data_fd = os.open(upload.path(".part"), flags, 0o600)
        upload.journal_fd = os.open(upload.path(".chunks"), flags | os.O_APPEND, 0o600)
        return upload.data_fd, upload.journal_fd

    # --- the tasks -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._work, name="uploads.write")
                tg.start_soon(self._syncer, name="uploads.sync")
                tg.start_soon(self._tick, name="uploads.status")
                for upload in list(self._uploads.values()):
                    self._publish(upload, now=True)
                    if upload.received == upload.size:
                        self._finish_soon(upload)
                task_status.started()
        finally:
            self._stopping = True
            while self._inbox:  # left unacknowledged: the broker sends them again
                self._inbox.popleft().receipt.release()
            for upload in self._uploads.values():
                upload.close()

    async def _work(self) -> None:
        while True:
            while not self._inbox:
                self._arrived = anyio.Event()
                await self._arrived.wait()
            item = self._inbox.popleft()
            with anyio.CancelScope(shield=True):  # a chunk begun is written and accounted
                await self._take(item)

    async def _take(self, item: _Item) -> None:
        receipt = item.receipt
        settle = True
        try:
            if receipt.redelivered:
                settle = False  # its connection closed, the broker kept the session: resent
            elif item.topic.kind == "upload":
                await self._manifest(item.topic, item.message)
            else:
                settle = await self._chunk(item.topic, item.message, receipt)
        except Exception as exc:  # a bad message never stops the uploads
            log.exception("upload message failed unexpectedly", topic=item.message.topic)
            self._refuse(item.topic.sha256, Internal(f"{type(exc).__name__}: {exc}"))
        finally:
            if settle:
                receipt.settle()
            receipt.release()

    # --- manifests -------------------------------------------------------------------------

    async def _manifest(self, topic: UploadTopic, message: Inbound) -> None:
        sha256 = topic.sha256
        if topic.problem is not None:
            self._refuse(sha256, InvalidPayload(topic.problem, path="topic"))
            return
        if message.retain:
            self._refuse(sha256, RetainedCommand())
            return
        try:
            # checked like a command: a signature, when there is one, must verify; none is
            # `unauthorized` with require_signed; only a key for every camera may sign one
            payload = message.payload
            signature = find_signature(payload, message.user_properties)
            if signature is not None:
                payload = signature.payload  # the manifest inside an envelope
            authenticity = self._policy.check(message.topic, None, signature, what="manifest")
            manifest = decode_manifest(payload)
            if authenticity.signed:
                self._policy.check_expiry(manifest.expires_at, time.time(), what="manifest")
            if manifest.chunk_size > self._max_chunk:
                raise InvalidPayload(
                    f"chunk_size {manifest.chunk_size} is above agent.max_payload_bytes "
                    f"({self._max_chunk})",
                    path="$.chunk_size",
                )
            now = time.time()
            if manifest.expires_at is not None and now > manifest.expires_at:
                raise Expired(expires_at=manifest.expires_at, now=now)
        except AgentError as exc:
            self._refuse(sha256, exc)
            return
        upload = self._uploads.get(sha256)
        if upload is None and self._store.exists(sha256):
            with contextlib.suppress(ModelNotFound):  # a corrupted one is removed: upload it
                model = await self._store.get(sha256)
                self._end(sha256, "stored", model.size, manifest.request_id)
                return
        if upload is not None:
            if manifest.size != upload.size:
                self._refuse(
                    sha256,
                    InvalidPayload(
                        f"size {manifest.size} differs from the upload in progress "
                        f"({upload.size}) for the same sha256",
                        path="$.size",
                    ),
                )
                return
            if manifest.chunk_size == upload.chunk_size:
                upload.manifest = manifest  # its expires_at, request_id and name now
                upload.last_progress = time.time()
                upload.error = None
                try:  # kept for a restart, and its time counts as progress then
                    await anyio.to_thread.run_sync(self._write_manifest, upload)
                except OSError as exc:
                    problem = f"cannot keep the manifest: {exc.strerror or exc}"
                    upload.error = error_info(StateWriteFailed(problem))
                self._publish(upload, now=True)
                return
            log.info(
                "upload restarted with another chunk_size",
                sha256=sha256,
                was=upload.chunk_size,
                now=manifest.chunk_size,
            )
            await self._restart(upload, manifest)
            return
        await self._start(sha256, manifest)

    async def _start(self, sha256: str, manifest: UploadManifest) -> None:
        limit = self._settings.max_partial_bytes
        used = sum(u.size for u in self._uploads.values())
        if used + manifest.size > limit:
            self._refuse(
                sha256,
                StorageFull(
                    f"an upload of {manifest.size} bytes does not fit: uploads in progress "
                    f"hold {used} of {limit} bytes (models.max_partial_bytes)"
                ),
                size=manifest.size,
            )
            return
        if len(self._uploads) >= MAX_UPLOADS:
            self._refuse(
                sha256,
                StorageFull(f"{MAX_UPLOADS} uploads are in progress; finish one first"),
                size=manifest.size,
            )
            return
        upload = self._new(sha256, manifest)
        try:
            await anyio.to_thread.run_sync(self._create, upload)
        except OSError as exc:
            upload.close()
            self._refuse(
                sha256, StateWriteFailed(f"cannot start the upload: {exc.strerror or exc}")
            )
            return
        self._uploads[sha256] = upload
        self._finished.pop(sha256, None)
        log.info(
            "upload started", sha256=sha256, size=manifest.size, chunk_size=manifest.chunk_size
        )
        self._publish(upload, now=True)

    def _create(self, upload: _Upload) -> None:
        """Write the manifest atomically, then create the data file and the journal empty."""
        make_private_folder(self.folder)
        _unlink(upload.path(".part"), upload.path(".chunks"))
        self._write_manifest(upload)
        self._open(upload)

    def _write_manifest(self, upload: _Upload) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_manifest_encoder.encode(upload.manifest))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, upload.path(".manifest"))
        finally:
            _unlink(self.folder / os.path.basename(tmp))
        _fsync_dir(self.folder)

    # --- chunks ----------------------------------------------------------------------------

    async def _chunk(self, topic: UploadTopic, message: Inbound, receipt: Receipt) -> bool:
        """Write one chunk; True when its receipt may be settled now, False once durable."""
        sha256, payload = topic.sha256, message.payload
        upload = self._uploads.get(sha256)
        if topic.problem is not None or topic.offset is None:
            self._refuse(sha256, InvalidChunk(topic.problem or "no offset"))
            return True
        if message.retain:
            self._refuse(sha256, RetainedCommand())
            return True
        if upload is None:
            if sha256 not in self._finished and not self._store.exists(sha256):
                self._refuse(sha256, UploadNotFound(sha256=sha256))
            return True  # else a late copy of a chunk of an upload that ended
        if upload.finishing:
            return True  # every chunk is there
        offset = topic.offset
        problem = self._chunk_problem(upload, offset, len(payload))
        if problem is not None:
            self._refuse(sha256, InvalidChunk(problem))
            return True
        index = offset // upload.chunk_size
        if upload.have[index]:
            return True  # a duplicate of a durable chunk
        waiting = upload.pending.get(index)
        if waiting is not None:  # a duplicate of one on its way: settled with it
            waiting.append(receipt)
            return False
        async with upload.lock:
            fd = upload.data_fd
            if fd is None or upload.done.is_set():
                return True  # it ended meanwhile
            try:
                await anyio.to_thread.run_sync(os.pwrite, fd, payload, offset)
            except OSError as exc:
                error = StateWriteFailed(f"cannot write the chunk: {exc.strerror or exc}")
                self._fail_soon(upload, error)
                return True
        upload.pending.setdefault(index, []).append(receipt)
        self._sync_wanted.set()
        return False

    @staticmethod
    def _chunk_problem(upload: _Upload, offset: int, length: int) -> str | None:
        if offset >= upload.size:
            return f"offset {offset} is outside the model's {upload.size} bytes"
        if offset % upload.chunk_size:
            return f"offset {offset} is not a multiple of chunk_size {upload.chunk_size}"
        expected = upload.length(offset // upload.chunk_size)
        if length != expected:
            return f"the chunk at offset {offset} has {length} bytes; it must have {expected}"
        return None

    async def _syncer(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted = anyio.Event()
            for upload in [u for u in self._uploads.values() if u.pending]:
                with anyio.CancelScope(shield=True):
                    await self._sync(upload)

    async def _sync(self, upload: _Upload) -> None:
        """Make the chunks written so far durable, journal them, then count and settle them."""
        async with upload.lock:
            batch, upload.pending = upload.pending, {}
            data_fd, journal_fd = upload.data_fd, upload.journal_fd
            if data_fd is None or journal_fd is None:  # it ended: every chunk is answered
                _settle(batch)
                return
            records = b"".join(_record(index) for index in sorted(batch))
            try:
                await anyio.to_thread.run_sync(_sync_files, data_fd, journal_fd, records)
            except OSError as exc:
                error = StateWriteFailed(f"cannot write the upload: {exc.strerror or exc}")
                self._fail_soon(upload, error)
                _settle(batch)
                return
        for index in batch:
            if not upload.have[index]:
                upload.have[index] = 1
                upload.received += upload.length(index)
        _settle(batch)
        upload.last_progress = time.time()
        upload.error = None
        for watcher in list(upload.watchers):
            watcher(upload.received, upload.size)
        if upload.received == upload.size:
            self._finish_soon(upload)
        else:
            self._publish(upload)

    # --- the end of an upload ----------------------------------------------------------------

    def _finish_soon(self, upload: _Upload) -> None:
        if upload.finishing or self._task_group is None:
            return
        upload.finishing = True
        self._publish(upload, now=True)  # all received; `stored` follows the check
        self._task_group.start_soon(self._finish, upload, name=f"uploads.finish[{upload.sha256}]")

    async def _finish(self, upload: _Upload) -> None:
        """Hash and parse the complete model (two at most at once), then store it."""
        async with self._hashing:
            async with upload.lock:
                upload.close()
            part = upload.path(".part")
            try:
                model = await self._store_part(upload, part)
            except AgentError as exc:
                await self._fail(upload, exc)
                return
            except OSError as exc:
                await self._fail(upload, StateWriteFailed(f"{exc.strerror or exc}"))
                return
            except Exception as exc:  # a model nobody vetted never stops the uploads
                log.exception("storing an upload failed unexpectedly", sha256=upload.sha256)
                await self._fail(upload, Internal(f"{type(exc).__name__}: {exc}"))
                return
        del self._uploads[upload.sha256]
        await anyio.to_thread.run_sync(
            _unlink, upload.path(".manifest"), upload.path(".chunks"), part
        )
        _settle(upload.pending)  # late copies of chunks it had
        upload.pending = {}
        log.info("upload stored", sha256=upload.sha256, size=upload.size)
        upload.outcome = model
        upload.done.set()
        self._end(upload.sha256, "stored", upload.size, upload.manifest.request_id)

    async def _store_part(self, upload: _Upload, part: Path) -> StoredModel:
        """Check the whole model's sha256, then have the store parse and take it."""
        actual = await anyio.to_thread.run_sync(_hash_file, part)
        if actual != upload.sha256:
            raise ChecksumMismatch(expected=upload.sha256, actual=actual)
        return await self._store.put_file(part, upload.sha256, name=upload.manifest.model_name)

    def _fail_soon(self, upload: _Upload, error: AgentError) -> None:
        if self._task_group is not None and not upload.done.is_set():
            self._task_group.start_soon(self._fail, upload, error)

    async def _fail(self, upload: _Upload, error: AgentError) -> None:
        """End an upload with `error`: its files are deleted, its status says `failed`."""
        if upload.done.is_set():
            return
        upload.outcome = error
        upload.done.set()
        if self._uploads.get(upload.sha256) is upload:
            del self._uploads[upload.sha256]
        log.warning("upload failed", sha256=upload.sha256, code=error.code, error=error.message)
        await self._remove_files(upload)
        _settle(upload.pending)
        upload.pending = {}
        self._end(
            upload.sha256,
            "failed",
            upload.size,
            upload.manifest.request_id,
            error=error_info(error),
        )

    async def _restart(self, upload: _Upload, manifest: UploadManifest) -> None:
        """Start an upload again from nothing (another chunk_size); who waits for it waits on."""
        del self._uploads[upload.sha256]
        upload.finishing = True  # its chunks are no longer taken
        await self._remove_files(upload)
        _settle(upload.pending)
        upload.pending = {}
        await self._start(upload.sha256, manifest)
        upload.done.set()  # no outcome: its waiters turn to the new one

    async def _remove_files(self, upload: _Upload) -> None:
        async with upload.lock:
            upload.close()
        # the manifest first: a crash midway leaves no upload to resume, only files to drop
        await anyio.to_thread.run_sync(
            _unlink, upload.path(".manifest"), upload.path(".part"), upload.path(".chunks")
        )

    # --- statuses --------------------------------------------------------------------------

    def _refuse(self, sha256: str, error: AgentError, *, size: int = 0) -> None:
        """Answer a message that was refused on the upload's status topic."""
        log.warning("upload message refused", sha256=sha256, code=error.code, error=error.message)
        upload = self._uploads.get(sha256)
        if upload is not None:
            upload.error = error_info(error)  # the upload goes on
            self._publish(upload)  # within 0.5 s: a burst of refusals is one status
            return
        self._end(sha256, "failed", size, None, error=error_info(error))

    def _end(
        self,
        sha256: str,
        state: UploadStateName,
        size: int,
        request_id: str | None,
        *,
        error: ErrorInfo | None = None,
    ) -> None:
        """Publish a final status now; it is cleared `status_retention` seconds later."""
        status = UploadStatus(
            state=state,
            size=size,
            received=size if state == "stored" else 0,  # a failed upload's bytes are gone
            missing=() if state == "stored" else ((0, size),) if size else (),
            updated_at=time.time(),
            request_id=request_id,
            error=error,
        )
        now = time.monotonic()
        previous = self._finished.pop(sha256, None)
        ended = _Ended(clear_at=now + self._settings.status_retention, published_at=now)
        if previous is not None and now - previous.published_at < _STATUS_EVERY:
            # refusals in a burst: one status per 0.5 s, the latest
            ended.published_at, ended.deferred = previous.published_at, status
        else:
            self._reporter.upload_status(sha256, status)
        self._finished[sha256] = ended
        while len(self._finished) > _MAX_FINISHED:  # a flood of bad topics: clear early
            oldest = next(iter(self._finished))
            del self._finished[oldest]
            self._reporter.upload_status(oldest, None)

    def _publish(self, upload: _Upload, *, now: bool = False) -> None:
        upload.dirty = True
        if now or time.monotonic() - upload.published_at >= _STATUS_EVERY:
            self._publish_status(upload)

    def _publish_status(self, upload: _Upload) -> None:
        upload.dirty = False
        upload.published_at = time.monotonic()
        self._reporter.upload_status(upload.sha256, upload.status())

    async def _tick(self) -> None:
        """Rate-limited statuses, timeouts and expiries, cleared statuses, the models list."""
        while True:
            await anyio.sleep(_TICK)
            now, wall = time.monotonic(), time.time()
            for upload in list(self._uploads.values()):
                if upload.finishing:
                    continue
                expires_at = upload.manifest.expires_at
                if wall - upload.last_progress > self._settings.upload_timeout:
                    await self._fail(upload, UploadTimeout(seconds=self._settings.upload_timeout))
                elif expires_at is not None and wall > expires_at:
                    await self._fail(upload, Expired(expires_at=expires_at, now=wall))
                elif upload.dirty and now - upload.published_at >= _STATUS_EVERY:
                    self._publish_status(upload)
            for sha256, ended in list(self._finished.items()):
                if ended.deferred is not None and now - ended.published_at >= _STATUS_EVERY:
                    self._reporter.upload_status(sha256, ended.deferred)
                    ended.deferred, ended.published_at = None, now
                if ended.clear_at <= now:
                    del self._finished[sha256]
                    if sha256 not in self._uploads:
                        self._reporter.upload_status(sha256, None)
            if now - self._models_at >= _MODELS_EVERY:
                await self._publish_models()

    # --- the `{base}/models` list ------------------------------------------------------------

    def _store_changed(self) -> None:
        self._models_changed = True

    async def _publish_models(self) -> None:
        in_use, kept = use = self._in_use(), self._kept()
        if not self._models_changed and use == self._last_use:
            return
        self._models_changed = False
        self._last_use = use
        self._models_at = time.monotonic()
        files = await self._store.files()
        entries = tuple(
            ModelEntry(
                sha256=f.sha256,
                size=f.size,
                name=f.name,
                stored_at=f.stored_at,
                last_used=f.last_used,
                in_use_by=tuple(sorted(in_use.get(f.sha256, ()))),
                previous_for=tuple(sorted(kept.get(f.sha256, ()))),
            )
            for f in files
        )
        if entries != self._models_published:
            self._models_published = entries
            self._reporter.models(entries)


def _sync_files(data_fd: int, journal_fd: int, records: bytes) -> None:
    os.fdatasync(data_fd)  # the bytes first: a journaled chunk is always on disk
    os.write(journal_fd, records)
    os.fsync(journal_fd)


def _settle(batch: dict[int, list[Receipt]]) -> None:
    for receipts in batch.values():
        for receipt in receipts:
            receipt.settle()
