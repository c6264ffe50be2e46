"""Models on their way: a chunked upload in progress, or a `model_url` to download.

A deploy naming such a model is accepted before the model is there (`agent.lifecycle`: it is
`transferring` meanwhile); `Transfers.model` is what its request awaits. Downloads go to
`{state_dir}/downloads/<sha256>.part` (resumed from there by a later deploy of the same model
after a restart; parts untouched for `models.upload_timeout` are removed at start-up), one
download per model however many deploys wait for it, then through the model store like an
upload (parsed by depthai, at most two at once, renamed in).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio
import structlog

from agent.download import check_url, download, redact_url
from agent.errors import AgentError, Internal, PayloadTooLarge
from agent.messages import ModelByHash, ModelUpload, ModelUrl
from agent.state import make_private_folder

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from agent.config import DownloadSettings
    from agent.models import ModelStore, StoredModel
    from agent.uploads import Uploads

__all__ = ["Transfers"]

log = structlog.get_logger(__name__)

_STORING: Final = 2  # downloaded models parsed and stored at once


@dataclass(eq=False, slots=True)
class _Download:
    watchers: list[Callable[[int, int | None], None]] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: StoredModel | AgentError | None = None
    received: int = 0
    total: int | None = None

    def progress(self, received: int, total: int | None) -> None:
        self.received, self.total = received, total
        for watcher in list(self.watchers):
            watcher(received, total)


class Transfers:
    """Tells whether a deploy's model is on its way, and gets it."""

    def __init__(
        self,
        folder: Path,
        *,
        store: ModelStore,
        uploads: Uploads,
        settings: DownloadSettings,
        abandon_after: float,
    ) -> None:
        self.folder = folder
        self._store = store
        self._uploads = uploads
        self._settings = settings
        self._abandon_after = abandon_after
        self._downloads: dict[str, _Download] = {}
        self._storing = anyio.CapacityLimiter(_STORING)

    def clean_up(self) -> None:
        """At start-up: a private folder, without the parts nobody resumed for long."""
        try:
            make_private_folder(self.folder.parent)  # the state folder: private too
            make_private_folder(self.folder)
            old = time.time() - self._abandon_after
            for part in self.folder.iterdir():
                if part.stat().st_mtime < old:
                    part.unlink()
                    log.info("abandoned download removed", path=str(part))
        except OSError as exc:
            log.warning("download folder not usable", path=str(self.folder), error=str(exc))

    def on_its_way(self, source: ModelUpload | ModelByHash | ModelUrl) -> bool:
        """Whether the deploy waits for its model (else the store has it, or never will).

        Raises InvalidPayload for a `model_url` that may not be fetched, PayloadTooLarge for
        a `model_size` above `download.max_model_bytes`.
        """
        match source:
            case ModelUpload():
                return False
            case ModelByHash(sha256=sha256):
                if self._store.exists(sha256):
                    return False
                return self._uploads.in_progress(sha256) or sha256 in self._downloads
            case ModelUrl(url=url, sha256=sha256, size=size):
                check_url(url, self._settings)
                limit = self._settings.max_model_bytes
                if size is not None and size > limit:
                    raise PayloadTooLarge(size=size, limit=limit)
                return not self._store.exists(sha256)

    async def model(
        self,
        source: ModelByHash | ModelUrl,
        progress: Callable[[int, int | None], None],
        *,
        name: str | None,
    ) -> StoredModel:
        """The model once it is stored; raise why it cannot be had."""
        while True:
            fetching = self._downloads.get(source.sha256)
            if isinstance(source, ModelByHash) and fetching is None:
                return await self._uploads.wait(source.sha256, progress)
            if self._store.exists(source.sha256):
                return await self._store.get(source.sha256)
            if fetching is None:
                assert isinstance(source, ModelUrl)  # a ModelByHash only joins one
                return await self._download(source, progress, name=name)
            # the same model for another deploy: one download
            fetching.watchers.append(progress)
            progress(fetching.received, fetching.total)
            await fetching.done.wait()
            if isinstance(fetching.outcome, AgentError):
                raise fetching.outcome
            if fetching.outcome is not None:
                return fetching.outcome
            # the deploy that ran it was cancelled (shutting down): look again

    async def _download(
        self, source: ModelUrl, progress: Callable[[int, int | None], None], *, name: str | None
    ) -> StoredModel:
        """Run the download of `source` here, for every deploy that joins it meanwhile."""
        fetching = self._downloads[source.sha256] = _Download()
        fetching.watchers.append(progress)
        try:
            fetching.outcome = await self._fetch(source, fetching.progress, name=name)
        except AgentError as exc:
            fetching.outcome = exc
        except Exception as exc:
            log.exception("download failed unexpectedly", url=redact_url(source.url))
            fetching.outcome = Internal(f"{type(exc).__name__}")
        finally:
            del self._downloads[source.sha256]
            fetching.done.set()
        if isinstance(fetching.outcome, AgentError):
            raise fetching.outcome
        return fetching.outcome

    async def _fetch(
        self, source: ModelUrl, progress: Callable[[int, int | None], None], *, name: str | None
    ) -> StoredModel:
        part = self.folder / f"{source.sha256}.part"
        await anyio.to_thread.run_sync(make_private_folder, self.folder)
        log.info("download started", url=redact_url(source.url), size=source.size)
        await download(
            source.url,
            part,
            sha256=source.sha256,
            size=source.size,
            settings=self._settings,
            progress=progress,
        )
        async with self._storing:
            try:
                model = await self._store.put_file(part, source.sha256, name=name)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()  # not a blob: nothing to resume
                meta = part.with_name(part.name + ".meta")
                with contextlib.suppress(FileNotFoundError):
                    meta.unlink()
        log.info("download stored", url=redact_url(source.url), size=model.size)
        return model
