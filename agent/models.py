"""MyriadX blob parsing and the content-addressed model store.

Blobs are parsed by depthai's own reader (`dai.OpenVINO.Blob`), from a file path: parsing
from memory is about ten times slower. This is the one module outside `agent.cameras` that
imports depthai, and it uses only the blob reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import depthai as dai
import structlog

from agent.errors import ChecksumMismatch, InvalidModel, ModelNotFound

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BlobInfo", "ModelStore", "StoredModel", "TensorInfo", "parse_blob"]

log = structlog.get_logger(__name__)

_PRUNE_GRACE_SECONDS: Final = 300.0

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


def _write_parsed(folder: Path, sha256: str, data: bytes) -> tuple[Path, BlobInfo]:
    """Write `data` as `<sha256>.blob` atomically, parsing it before it is renamed in place."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        info = parse_blob(tmp)
        final = folder / f"{sha256}.blob"
        tmp.replace(final)
        _fsync_dir(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return final, info


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

    def __init__(self, root: Path, *, on_write_error: Callable[[str], None]) -> None:
        self.root = root
        # where models go while `root` cannot be written: they serve until the next restart
        self._fallback = Path(tempfile.gettempdir()) / f"oak-agent-models-{os.getuid()}"
        self._on_write_error = on_write_error
        self._known: dict[str, StoredModel] = {}
        self._limiter = anyio.CapacityLimiter(1)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.blob"

    async def put(self, data: bytes, *, expected_sha256: str | None = None) -> StoredModel:
        """Verify, parse and store a blob; raise ChecksumMismatch or InvalidModel."""
        model, problem = await anyio.to_thread.run_sync(
            self._put, data, expected_sha256, limiter=self._limiter
        )
        if problem is not None:  # reported here, on the event loop, not from the thread
            self._on_write_error(problem)
        return model

    async def get(self, sha256: str) -> StoredModel:
        """Return a stored blob; raise ModelNotFound when absent or corrupted."""
        return await anyio.to_thread.run_sync(self._get, sha256, limiter=self._limiter)

    async def prune(self, keep: set[str]) -> list[str]:
        """Remove blobs neither in `keep` nor used in the last minutes; return them."""
        return await anyio.to_thread.run_sync(self._prune, keep, limiter=self._limiter)

    def _prune(self, keep: set[str]) -> list[str]:
        removed = []
        recent = time.time() - _PRUNE_GRACE_SECONDS  # a model between upload and accept
        for path in self.root.glob("*.blob"):
            with contextlib.suppress(OSError):
                if path.stem not in keep and path.stat().st_mtime < recent:
                    path.unlink()
                    self._known.pop(path.stem, None)
                    removed.append(path.stem)
        if removed:
            log.info("unreferenced models removed", models=removed)
        return removed

    def _put(self, data: bytes, expected: str | None) -> tuple[StoredModel, str | None]:
        sha256 = hashlib.sha256(data).hexdigest()
        if expected is not None and expected != sha256:
            raise ChecksumMismatch(expected=expected, actual=sha256)
        known = self._fresh(sha256)
        if known is not None:
            return known, None
        problem = None
        try:
            final, info = _write_parsed(self.root, sha256, data)
        except OSError as exc:
            problem = f"cannot store model in {self.root}: {exc.strerror or exc}"
            final, info = _write_parsed(self._fallback, sha256, data)
        model = StoredModel(sha256=sha256, size=len(data), path=final, info=info)
        self._known[sha256] = model
        return model, problem

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
