"""Desired state on disk: what each camera should run, what last ran (and ran before that,
for a rollback), and recent outcomes.

One JSON document, replaced atomically (temp file, fsync, rename, fsync of the folder), so a
power cut leaves either the old or the new document. A document that cannot be read is
moved aside and reported; the agent then starts empty rather than crash-looping on it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from typing import TYPE_CHECKING, Final

import anyio
import msgspec
import structlog

from agent.cameras.base import Deployment
from agent.errors import clip
from agent.limits import json_problem
from agent.messages import Event, NNConfig, OutputOptions, ReplyTo
from agent.vocab import Action

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from agent.models import StoredModel
    from agent.requests import Request

__all__ = [
    "CameraState",
    "StateDocument",
    "StateFile",
    "StoredDeployment",
    "StoredRequest",
    "make_private_folder",
    "private_temp_file",
]

log = structlog.get_logger(__name__)

FORMAT_VERSION: Final = 1
_PRIVATE: Final = 0o700
_PRIVATE_FILE: Final = 0o600
_TMP_PREFIX: Final = ".state-"
_TMP_SUFFIX: Final = ".tmp"


def make_private_folder(folder: Path) -> None:
    """Create `folder` (and parents) as 0700 whatever the umask; tighten an existing one
    when others may read it (logged)."""
    try:
        folder.mkdir(mode=_PRIVATE, parents=True)
    except FileExistsError:
        if not folder.is_dir():
            raise
    else:
        folder.chmod(_PRIVATE)  # mkdir's mode passes through the umask
        return
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        folder.chmod(mode & _PRIVATE)
        log.warning("folder was open to others; now 0700", path=str(folder), was=oct(mode))


def private_temp_file(folder: Path, *, prefix: str, suffix: str) -> tuple[int, str]:
    """`tempfile.mkstemp` in `folder` (made private when missing), the file 0600 whatever
    the umask; its descriptor and name."""
    if not folder.is_dir():
        make_private_folder(folder)
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, _PRIVATE_FILE)  # mkstemp asks for 0600, and the umask may take bits off
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, name


class StoredDeployment(msgspec.Struct, frozen=True):
    """A `Deployment` as stored: its model named by sha256 (the store has the blob)."""

    sha256: str
    size: int
    nn_config: NNConfig
    labels: tuple[str, ...] | None = None
    model_name: str | None = None
    request_id: str = ""
    # absent in files written before output shaping: the agent's `[output]` then applies
    output: OutputOptions | None = None

    @classmethod
    def of(cls, deployment: Deployment) -> StoredDeployment:
        return cls(
            sha256=deployment.model.sha256,
            size=deployment.model.size,
            nn_config=deployment.nn_config,
            labels=deployment.labels,
            model_name=deployment.model_name,
            request_id=deployment.request_id,
            output=deployment.output,
        )

    def deployment(self, model: StoredModel, output: OutputOptions | None = None) -> Deployment:
        """The deployment again, with its model found in the store (and `output` when the
        stored one has none)."""
        return Deployment(
            model=model,
            nn_config=self.nn_config,
            labels=self.labels,
            model_name=self.model_name,
            request_id=self.request_id,
            output=self.output or output or OutputOptions(),
        )


class StoredRequest(msgspec.Struct, frozen=True):
    """A request that was accepted and had not finished when the document was written."""

    request_id: str
    action: Action
    camera: str
    stream: str
    replies: tuple[ReplyTo, ...] = ()
    # the group a group command was sent to (absent in files written before it was kept):
    # its `interrupted` answer names it like the request's other events
    group: str | None = None

    @classmethod
    def of(cls, request: Request) -> StoredRequest:
        return cls(
            request_id=request.id,
            action=request.action,
            camera=request.camera,
            stream=request.stream,
            replies=tuple(request.replies),
            group=request.group,
        )


class CameraState(msgspec.Struct, frozen=True):
    # what the camera should run once every accepted request is applied
    desired: dict[str, StoredDeployment] = {}
    # what the camera last ran successfully: the fallback when applying `desired` fails
    last_good: dict[str, StoredDeployment] = {}
    # stream -> sha256 of the model it ran before its current one, kept for a rollback
    # (absent in files written before it was kept: nothing is kept then)
    previous: dict[str, str] = {}

    @classmethod
    def of(
        cls,
        desired: Mapping[str, Deployment],
        last_good: Mapping[str, Deployment],
        previous: Mapping[str, str] | None = None,
    ) -> CameraState:
        return cls(
            desired={s: StoredDeployment.of(d) for s, d in desired.items()},
            last_good={s: StoredDeployment.of(d) for s, d in last_good.items()},
            previous=dict(previous or {}),
        )


class StateDocument(msgspec.Struct, frozen=True):
    version: int = FORMAT_VERSION
    saved_at: float = 0.0
    cameras: dict[str, CameraState] = {}
    in_flight: tuple[StoredRequest, ...] = ()
    # terminal events of recent requests, oldest first: duplicate detection across restarts
    outcomes: tuple[Event, ...] = ()
    # request_id -> expires_at of the signed requests among `outcomes` and `in_flight`:
    # their records are kept against replays until then
    signed_until: dict[str, float] = {}

    def models(self) -> set[str]:
        """The sha256 of every model a camera's desired or last-good set names, and of the
        model each stream ran before its current one."""
        named = {
            item.sha256
            for camera in self.cameras.values()
            for items in (camera.desired, camera.last_good)
            for item in items.values()
        }
        return named.union(*(camera.previous.values() for camera in self.cameras.values()))


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(StateDocument)


def _decode(raw: bytes) -> StateDocument | str:
    """The document, or why it does not decode: no content of the file escapes as an error."""
    problem = json_problem(raw)
    if problem is not None:
        return problem
    try:
        raw.decode("utf-8")  # written UTF-8 throughout; msgspec would skip bad bytes it ignores
        return _decoder.decode(raw)
    except UnicodeDecodeError as exc:
        return f"not UTF-8 at byte {exc.start}"
    except (msgspec.MsgspecError, RecursionError, ValueError) as exc:
        return clip(str(exc), 200)


class StateFile:
    """`state.json` in the state folder; writes are serialised and atomic."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "state.json"
        self._lock = anyio.Lock()

    def load(self) -> tuple[StateDocument, str | None]:
        """The stored document, or an empty one and why the stored one was unusable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return StateDocument(), None
        except OSError as exc:
            return StateDocument(), f"cannot read {self.path}: {exc.strerror}"
        document = _decode(raw)
        if isinstance(document, str):
            kept = self._keep_aside()
            return StateDocument(), f"{self.path} is unreadable ({document}); kept as {kept}"
        if document.version != FORMAT_VERSION:
            kept = self._keep_aside()
            return StateDocument(), f"{self.path} has format {document.version}; kept as {kept}"
        return document, None

    def _keep_aside(self) -> str:
        aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
        try:
            self.path.replace(aside)
        except OSError as exc:
            return f"(not moved: {exc.strerror})"
        return aside.name

    def make_folder(self) -> None:
        """Create the state folder private (0700), tighten a looser one, drop torn temp files.

        No other process writes here, so a temp file found at start-up is a write that a
        crash cut off. Problems are logged: the first write reports them.
        """
        try:
            make_private_folder(self.path.parent)
            for leftover in self.path.parent.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                leftover.unlink()
                log.info("torn state write removed", path=str(leftover))
        except OSError as exc:
            log.warning("state folder not usable", path=str(self.path.parent), error=str(exc))

    async def save(self, snapshot: Callable[[], StateDocument]) -> None:
        """Write what `snapshot` returns atomically; raise OSError when the disk refuses.

        The snapshot is taken once the previous write is done, so writes never go back
        in time.
        """
        async with self._lock:
            document = msgspec.structs.replace(snapshot(), saved_at=time.time())
            await anyio.to_thread.run_sync(self._write, _encoder.encode(document))

    def _write(self, payload: bytes) -> None:
        folder = self.path.parent
        fd, tmp = private_temp_file(folder, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
