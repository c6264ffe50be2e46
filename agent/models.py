"""MyriadX blob parsing and the content-addressed model store.

Blobs are parsed by depthai's own reader (`dai.OpenVINO.Blob`), from a file path: parsing
from memory is about ten times slower. This is the one module outside `agent.cameras` that
imports depthai, and it uses only the blob reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import depthai as dai
import msgspec
import structlog

from agent.errors import ChecksumMismatch, InvalidModel, ModelNotFound, StateWriteFailed
from agent.state import make_private_folder, private_temp_file

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BlobInfo", "ModelStore", "StoredFile", "StoredModel", "TensorInfo", "parse_blob"]

log = structlog.get_logger(__name__)

# a model between upload and acceptance is referenced by nothing yet: spared this long
# (`[models] keep_unreferenced`)
_PRUNE_GRACE_SECONDS: Final = 300.0
# how often models past that time are looked for: every minute, more often for a short
# time (half of it), never more often than this
_PRUNE_EVERY_SECONDS: Final = 60.0
_PRUNE_EVERY_MIN_SECONDS: Final = 0.5
# unreferenced models kept within the grace period, newest first, at most this many bytes
_UNREFERENCED_BYTES: Final = 256 * 1024 * 1024
_TMP_PREFIX: Final = ".incoming-"
_TMP_SUFFIX: Final = ".tmp"
_META_SUFFIX: Final = ".meta.json"  # beside `<sha256>.blob`: its name and when it was stored

_DTYPES: Final = {
    "FP16": "float16",
    "FP32": "float32",
    "U8F": "uint8",
    "I8": "int8",
    "INT": "int32",
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    # natural order (N, C, H, W); depthai lists dims reversed
    dims: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class BlobInfo:
    version: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True, slots=True)
class StoredModel:
    sha256: str
    size: int
    path: Path
    info: BlobInfo


class _Meta(msgspec.Struct, frozen=True):
    name: str | None = None
    stored_at: float = 0.0


_meta_encoder: Final = msgspec.json.Encoder()
_meta_decoder: Final = msgspec.json.Decoder(_Meta)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A model in the store as the `{base}/models` list shows it."""

    sha256: str
    size: int
    name: str | None
    stored_at: float
    last_used: float


def _tensor(name: str, tensor: object) -> TensorInfo:
    dims = tuple(int(d) for d in reversed(tensor.dims))  # type: ignore[attr-defined]
    dtype = tensor.dataType.name  # type: ignore[attr-defined]
    return TensorInfo(name=name, dims=dims, dtype=_DTYPES.get(dtype, dtype.lower()))


def parse_blob(path: Path) -> BlobInfo:
    """Parse a MyriadX blob file; raise InvalidModel when depthai cannot read it."""
    try:
        blob = dai.OpenVINO.Blob(path)
    except (RuntimeError, ValueError) as exc:  # ValueError: a truncated blob
        raise InvalidModel(f"not a MyriadX blob: {exc}") from exc
    inputs = tuple(_tensor(n, t) for n, t in blob.networkInputs.items())
    outputs = tuple(_tensor(n, t) for n, t in blob.networkOutputs.items())
    if not inputs or not outputs:
        raise InvalidModel("blob has no inputs or no outputs")
    return BlobInfo(
        version=dai.OpenVINO.getVersionName(blob.version), inputs=inputs, outputs=outputs
    )


def _nothing() -> None:
    """Nobody to tell."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_parsed(folder: Path, data: bytes) -> tuple[Path, BlobInfo]:
    """Write `data` to a temp file in `folder`, fsynced, and parse it; the temp file's path."""
    fd, tmp_name = private_temp_file(folder, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        info = parse_blob(tmp)
    except BaseException:
        _remove(tmp)
        raise
    return tmp, info


def _remove(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


def _touch(path: Path) -> bool:
    """Mark a model as used now, so pruning spares it until it is referenced; False if gone.

    Between upload (or lookup) and acceptance a model is referenced by nothing yet.
    """
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        pass  # a read-only store: nothing prunes it either
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Blobs kept as `models/<sha256>.blob`; written atomically, verified when first read."""

    def __init__(
        self,
        root: Path,
        *,
        on_write_error: Callable[[str], None],
        unreferenced_bytes: int = _UNREFERENCED_BYTES,
        keep_unreferenced: float = _PRUNE_GRACE_SECONDS,
    ) -> None:
        self.root = root
        self._on_write_error = on_write_error
        self._unreferenced_bytes = unreferenced_bytes
        self._keep_unreferenced = keep_unreferenced
        # seconds between two looks for models past `keep_unreferenced` (see `prune`)
        self.prune_every = max(
            _PRUNE_EVERY_MIN_SECONDS, min(_PRUNE_EVERY_SECONDS, keep_unreferenced / 2)
        )
        self._known: dict[str, StoredModel] = {}
        # held to look up, install, load and prune; hashing, writing and parsing an upload
        # run beside it, so that one large upload holds up no other command
        self._limiter = anyio.CapacityLimiter(1)
        self._referenced: Callable[[], set[str]] = set
        self._changed: Callable[[], None] = _nothing

    def on_change(self, changed: Callable[[], None]) -> None:
        """Be told (on the event loop) when a model was added or removed."""
        self._changed = changed

    def keep_referenced(self, referenced: Callable[[], set[str]]) -> None:
        """Name the models pruning must keep (those the desired and last-good sets use, and
        the one each stream ran before its current one)."""
        self._referenced = referenced

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.blob"

    def clean_up(self) -> None:
        """At start-up: a private folder, and no temp file of an upload a crash cut off."""
        try:
            make_private_folder(self.root)
            for leftover in self.root.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                size = leftover.stat().st_size
                leftover.unlink()
                log.info("torn model upload removed", path=str(leftover), size=size)
        except OSError as exc:
            log.warning("model store not usable", path=str(self.root), error=str(exc))

    async def put(
        self, data: bytes, *, expected_sha256: str | None = None, name: str | None = None
    ) -> StoredModel:
        """Verify, parse and store a blob (`name`: for the `{base}/models` list); raise
        ChecksumMismatch, InvalidModel or StateWriteFailed (the store cannot be written: the
        command is refused)."""
        try:
            model, added = await self._put(data, expected_sha256, name)
        except OSError as exc:
            problem = f"cannot store model in {self.root}: {exc.strerror or exc}"
            self._on_write_error(problem)  # reported here, on the event loop
            raise StateWriteFailed(f"{problem}; nothing was changed, send it again") from exc
        if added:  # bound the store at once: uploads that end rejected are never referenced
            self._changed()
            await self.prune()
        return model

    async def get(self, sha256: str) -> StoredModel:
        """Return a stored blob; raise ModelNotFound when absent or corrupted."""
        return await anyio.to_thread.run_sync(self._get, sha256, limiter=self._limiter)

    async def prune(self) -> list[str]:
        """Remove unreferenced blobs: all used longer ago than the grace period, and the
        oldest ones beyond the byte bound (the newest is always kept); return them."""
        keep = self._referenced()  # read on the event loop, where it changes
        removed = await anyio.to_thread.run_sync(self._prune, keep, limiter=self._limiter)
        if removed:
            self._changed()
        return removed

    async def put_file(self, path: Path, sha256: str, *, name: str | None) -> StoredModel:
        """Move a complete, fsynced model file whose sha256 was checked into the store.

        The file is parsed first (InvalidModel: it stays where it is, for the caller to
        remove) and renamed into the store, so it must be on the store's file system. The
        caller bounds how many run at once.
        """
        info = await anyio.to_thread.run_sync(parse_blob, path)
        size = (await anyio.to_thread.run_sync(path.stat)).st_size
        try:
            model = await anyio.to_thread.run_sync(
                self._install, path, sha256, size, info, name, limiter=self._limiter
            )
        except OSError as exc:
            problem = f"cannot store model in {self.root}: {exc.strerror or exc}"
            self._on_write_error(problem)
            raise StateWriteFailed(problem) from exc
        self._changed()
        await self.prune()
        return model

    def exists(self, sha256: str) -> bool:
        """Whether the store has a file for `sha256` (not verified: see `get`)."""
        return self.path(sha256).is_file()

    async def files(self) -> list[StoredFile]:
        """Every stored model, for the `{base}/models` list."""
        return await anyio.to_thread.run_sync(self._files, limiter=self._limiter)

    def _files(self) -> list[StoredFile]:
        found = []
        for path in self.root.glob("*.blob"):
            try:
                info = path.stat()
            except OSError:
                continue
            meta = _Meta()
            with contextlib.suppress(OSError, msgspec.MsgspecError):
                meta = _meta_decoder.decode(self._meta_path(path.stem).read_bytes())
            found.append(
                StoredFile(
                    sha256=path.stem,
                    size=info.st_size,
                    name=meta.name,
                    stored_at=meta.stored_at or info.st_mtime,
                    last_used=info.st_mtime,
                )
            )
        return sorted(found, key=lambda f: f.stored_at)

    def _meta_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}{_META_SUFFIX}"

    def _prune(self, keep: set[str]) -> list[str]:
        recent = time.time() - self._keep_unreferenced
        unreferenced: list[tuple[float, int, Path]] = []
        for path in self.root.glob("*.blob"):
            with contextlib.suppress(OSError):
                if path.stem not in keep:
                    info = path.stat()
                    unreferenced.append((info.st_mtime, info.st_size, path))
        unreferenced.sort(reverse=True)  # newest first
        removed, kept_bytes = [], 0
        for index, (mtime, size, path) in enumerate(unreferenced):
            kept_bytes += size
            # the newest is kept in any case: it may be the one whose command is in hand
            if mtime >= recent and (kept_bytes <= self._unreferenced_bytes or index == 0):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                self._known.pop(path.stem, None)
                removed.append(path.stem)
                _remove(self._meta_path(path.stem))
        if removed:
            log.info("unreferenced models removed", models=removed)
        return removed

    async def _put(
        self, data: bytes, expected: str | None, name: str | None
    ) -> tuple[StoredModel, bool]:
        """The stored model, and whether it was added now."""
        # in threads of their own (the caller bounds how many): no lock of the store
        sha256 = await anyio.to_thread.run_sync(_sha256, data)
        if expected is not None and expected != sha256:
            raise ChecksumMismatch(expected=expected, actual=sha256)
        known = await anyio.to_thread.run_sync(self._fresh, sha256, limiter=self._limiter)
        if known is not None:
            return known, False
        tmp, info = await anyio.to_thread.run_sync(_write_parsed, self.root, data)
        try:
            model = await anyio.to_thread.run_sync(
                self._install, tmp, sha256, len(data), info, name, limiter=self._limiter
            )
        except BaseException:
            _remove(tmp)
            raise
        return model, True

    def _install(
        self, tmp: Path, sha256: str, size: int, info: BlobInfo, name: str | None = None
    ) -> StoredModel:
        """Rename a written and parsed upload to `<sha256>.blob`, atomically."""
        final = self.path(sha256)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # its name and time for the `{base}/models` list: not worth an fsync of its own
        meta = self._meta_path(sha256)
        spare = meta.with_name(f"{_TMP_PREFIX}{meta.name}{_TMP_SUFFIX}")
        spare.write_bytes(_meta_encoder.encode(_Meta(name=name, stored_at=time.time())))
        spare.replace(meta)
        tmp.replace(final)
        _fsync_dir(self.root)
        _touch(final)  # used now: its grace counts from here, not from when it was written
        model = StoredModel(sha256=sha256, size=size, path=final, info=info)
        self._known[sha256] = model
        return model

    def _get(self, sha256: str) -> StoredModel:
        return self._fresh(sha256) or self._load(sha256)

    def _fresh(self, sha256: str) -> StoredModel | None:
        """A model read before whose file is still there, touched (see `_touch`)."""
        known = self._known.get(sha256)
        if known is None:
            return None
        if not _touch(known.path):
            del self._known[sha256]
            return None
        return known

    def _load(self, sha256: str) -> StoredModel:
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            raise ModelNotFound(sha256=sha256) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            # a torn or corrupted write: never serve it
            with contextlib.suppress(OSError):
                path.unlink()
            raise ModelNotFound(sha256=sha256)
        model = StoredModel(sha256=sha256, size=len(data), path=path, info=parse_blob(path))
        _touch(path)
        self._known[sha256] = model
        return model
