"""One worker per camera: applies the desired NN set and reports every state change.

A command changes the camera's desired set; the worker applies everything queued with one
restart and reports the outcome to every request the restart included. A command replaced
by a later queued command for the same stream ends `superseded`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
import msgspec
import structlog

from agent.errors import AgentError, CameraOffline, ErrorInfo, Internal, error_info
from agent.messages import (
    CameraStatus,
    Event,
    ModelRef,
    NNStatus,
    NNSummary,
)
from agent.reporter import Route

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from agent.cameras.base import Camera, Deployment
    from agent.reporter import Reporter
    from agent.requests import Request
    from agent.topics import Topics
    from agent.vocab import CameraStateName, NNStateName, RequestState

__all__ = ["CameraWorker"]

log = structlog.get_logger(__name__)

_S = TypeVar("_S", NNStatus, CameraStatus)
_RETRY_MAX: Final = 60.0


@dataclass(eq=False, slots=True)
class _Staged:
    """A request in the state write under way, with what it does once that write is done."""

    request: Request
    settle: bool  # runs at once (no restart): recorded as succeeded by the same write
    replaced: Request | None = None  # a queued request it supersedes
    replaced_was_queued: bool = False  # (not one staged in the same write)


class CameraWorker:
    """Owns one camera; nothing else touches it."""

    def __init__(
        self,
        camera: Camera,
        reporter: Reporter,
        topics: Topics,
        *,
        changed: Callable[[], Awaitable[None]],
        hold: Callable[[Event, Request], None],
    ) -> None:
        self.camera = camera
        self._reporter = reporter
        self._topics = topics
        self._changed = changed  # persists the desired state
        # terminal events wait for the state write that records them: after a crash a
        # request is then either answered `interrupted` or had its answer, never both
        self._hold = hold
        # what runs (or ran last, while offline): the fallback when an apply fails
        self.running: dict[str, Deployment] = {}
        # submitted, waiting for the next state write; then `_writing` during that write
        self._staged: list[Request] = []
        self._writing: list[_Staged] = []
        self._pending: dict[str, Request] = {}
        self._applying: dict[str, Request] = {}
        self._failures: dict[str, tuple[Request, ErrorInfo]] = {}
        self._booted = False
        self._boot_failures = 0
        self.state: CameraStateName = "offline"
        self.restarts = 0
        self._last_error: ErrorInfo | None = None
        self._wake = anyio.Event()
        # set once the state saved for this camera by an earlier run is taken over
        self.restored = anyio.Event()
        self._published_nn: dict[str, NNStatus] = {}
        self._published_camera: CameraStatus | None = None

    @property
    def mxid(self) -> str:
        return self.camera.mxid

    # --- what the coordinator reads for the state file -----------------------------------

    def desired(self) -> dict[str, Deployment]:
        """The NN set once every request in the state file is applied."""
        target = dict(self.running)
        for batch in (self._applying, self._pending):
            _merge(target, batch)
        for staged in self._writing:
            _merge(target, {staged.request.stream: staged.request})
        return target

    def last_good(self) -> dict[str, Deployment]:
        """What runs, with the changes that need no restart of the write under way."""
        target = dict(self.running)
        for staged in self._writing:
            if staged.settle:
                _merge(target, {staged.request.stream: staged.request})
        return target

    def in_flight(self) -> list[Request]:
        """Requests the state file records as unfinished.

        Staged ones are there only in the last write at shutdown (each write takes them
        in first): not accepted, and not in the desired set, they are answered `interrupted`.
        """
        replaced = {id(s.replaced) for s in self._writing}
        unfinished = [
            *self._applying.values(),
            *self._pending.values(),
            *(s.request for s in self._writing if not s.settle),
            *self._staged,
        ]
        return [r for r in unfinished if not r.silent and id(r) not in replaced]

    def staged_deployments(self) -> list[Deployment]:
        """Models of requests submitted but not yet in a state write: not to be pruned."""
        return [r.deployment for r in self._staged if r.deployment is not None]

    # --- restoring after a restart -------------------------------------------------------

    def restore(self, running: dict[str, Deployment], changes: list[Request]) -> None:
        """Start from the last good set, with interrupted changes queued to converge."""
        self.running = running
        for request in changes:
            self._pending.setdefault(request.stream, request)
        self._wake.set()

    # --- called by the coordinator for a validated command -------------------------------

    def check_accepting(self) -> None:
        if not self.camera.present:
            raise CameraOffline(camera=self.mxid)

    def needs_apply(self, request: Request) -> bool:
        """False when the request changes nothing the camera runs: no restart needed."""
        if not self._booted or request.stream in self._applying:
            return True
        running = self.running.get(request.stream)
        if request.deployment is None:
            return running is not None
        return not request.deployment.same_network(running)

    def stage(self, request: Request) -> None:
        """Take a validated request in; nothing changes until a state write records it."""
        self._staged.append(request)

    def has_unwritten(self) -> bool:
        """True while a request waits for a state write that has not started yet."""
        return bool(self._staged)

    def has_staged(self) -> bool:
        """True while a request waits for a state write, or is in the one under way."""
        return bool(self._staged or self._writing)

    # --- the state write: prepare, then commit or roll back -------------------------------

    def prepare(self) -> bool:
        """Fold the staged requests into the write about to start; False if there were none.

        Their events (`accepted`, and `succeeded` or `superseded` where that is decided
        now) are held, to go out once the write that records them is done.
        """
        staged, self._staged = self._staged, []
        for request in staged:
            entry = _Staged(request, settle=not self.needs_apply(request))
            latest = next(
                (s for s in reversed(self._writing) if s.request.stream == request.stream), None
            )
            if latest is None:
                entry.replaced = self._pending.pop(request.stream, None)
                entry.replaced_was_queued = True
            elif not latest.settle:  # staged in this write and queued only after it
                entry.replaced = latest.request
            if entry.replaced is not None:
                self._emit(entry.replaced, "superseded", superseded_by=request.id)
            self._emit(request, "accepted", hold=True)
            if entry.settle:
                self._emit(request, "succeeded")
            self._writing.append(entry)
        return bool(self._writing)

    def commit(self) -> None:
        """The state write recorded the prepared requests: queue them or settle them."""
        writing, self._writing = self._writing, []
        replaced = {id(s.replaced) for s in writing}
        for staged in writing:
            request = staged.request
            if staged.settle:
                self._run_now(request)
            elif id(request) not in replaced:
                self._pending[request.stream] = request
                self._wake.set()
        self._publish_status()

    def roll_back(self) -> list[Request]:
        """The state write failed: forget the prepared requests; return them, to be refused."""
        writing, self._writing = self._writing, []
        for staged in reversed(writing):
            if staged.replaced is not None:
                if not staged.replaced.silent:
                    staged.replaced.events.pop()  # its `superseded`, never sent
                if staged.replaced_was_queued:
                    self._pending[staged.request.stream] = staged.replaced
            staged.request.events.clear()
        return [s.request for s in writing]

    def presence_changed(self) -> None:
        if self.camera.present:
            self._booted = False
        self._wake.set()

    # --- the worker loop -----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self._has_work():
                await self._wake.wait()
            self._wake = anyio.Event()
            if not self.camera.present:
                self._go_offline()
                await self._changed()
                continue
            if self._boot_failures > 1:  # the first retry (the rollback) goes at once
                delay = min(_RETRY_MAX, 2.0 ** (self._boot_failures - 2))
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if not self.camera.present:
                    continue
            await self._apply()
            await self._changed()

    def _has_work(self) -> bool:
        if not self.camera.present:
            return self.state != "offline" or bool(self._pending)
        return not self._booted or bool(self._pending)

    def _run_now(self, request: Request) -> None:
        """The request's change runs now (host-side fields may change alone)."""
        if request.deployment is not None:
            self.running[request.stream] = request.deployment
        else:
            self.running.pop(request.stream, None)
        self._failures.pop(request.stream, None)
        self._route(request.stream)

    def _settle(self, request: Request) -> None:
        self._run_now(request)
        self._emit(request, "succeeded")

    async def _apply(self) -> None:
        batch, self._pending = self._pending, {}
        target = dict(self.running)
        _merge(target, batch)
        restart = not (self._booted and _same_networks(target, self.running))
        if restart and not target and not self._booted:
            restart = False  # nothing to run: a camera with no NN needs no boot
        self._applying = batch
        for request in batch.values():
            self._emit(request, "applying")
        try:
            if restart:
                await self._restart(target)
            else:
                self._booted = True
                self.state = "online"
        except AgentError as exc:
            self._booted = False  # a failed apply leaves the camera running nothing
            self._boot_failures += 1
            info = error_info(exc)
            self._last_error = info
            log.warning(
                "apply failed",
                camera=self.mxid,
                code=exc.code,
                error=exc.message,
                requests=[r.id for r in batch.values()],
            )
            self._applying = {}
            for stream, request in batch.items():
                self._failures[stream] = (request, info)
                self._emit(request, "failed", error=info)
        else:
            self._boot_failures = 0
            self._applying = {}
            for request in batch.values():
                self._settle(request)
            for stream in self.running:
                self._route(stream)
        finally:
            # cancelled (shutting down): the batch stays in `_applying`, so a state write
            # that still happens records it as unfinished, to be answered `interrupted`
            self._publish_status()

    async def _restart(self, target: dict[str, Deployment]) -> None:
        self.state = "restarting"
        for stream in self.running:
            self._reporter.route(self.mxid, stream, None)
        self._publish_status()
        log.info("camera restarting", camera=self.mxid, streams=sorted(target))
        self.restarts += 1
        try:
            await self.camera.apply(target)
        except AgentError:
            raise
        except Exception as exc:
            log.exception("camera apply raised", camera=self.mxid)
            raise Internal(f"{type(exc).__name__}: {exc}") from exc
        self._booted = True
        self.state = "online"
        log.info("camera online", camera=self.mxid, streams=sorted(target))

    def _go_offline(self) -> None:
        self._booted = False
        self._boot_failures = 0
        for stream in self.running:
            self._reporter.route(self.mxid, stream, None)
        pending, self._pending = self._pending, {}
        error = error_info(CameraOffline(camera=self.mxid))
        for request in pending.values():
            self._emit(request, "failed", error=error)
        if self.state != "offline":
            log.warning("camera offline", camera=self.mxid)
            self.state = "offline"
        self._publish_status()

    # --- reporting -----------------------------------------------------------------------

    def _route(self, stream: str) -> None:
        deployment = self.running.get(stream)
        route = None
        if deployment is not None and self.state == "online":
            route = Route(
                topic=self._topics.detections(self.mxid, stream),
                model_sha256=deployment.model.sha256,
                type=type_name(deployment),
                labels=deployment.labels,
            )
        self._reporter.route(self.mxid, stream, route)

    def _emit(
        self,
        request: Request,
        state: RequestState,
        *,
        error: ErrorInfo | None = None,
        superseded_by: str | None = None,
        hold: bool = False,
    ) -> None:
        if request.silent:
            return
        event = Event(
            request_id=request.id,
            action=request.action,
            camera=request.camera,
            stream=request.stream,
            state=state,
            ts=time.time(),
            error=error,
            superseded_by=superseded_by,
        )
        request.events.append(event)
        if hold or event.terminal:
            self._hold(event, request)
        else:
            self._reporter.event(event, request.replies)

    def _nn_status(self, stream: str) -> NNStatus:
        request = self._pending.get(stream) or self._applying.get(stream)
        if request is not None and request.deployment is not None:
            return _status("deploying", request.deployment, request.id)
        failure = self._failures.get(stream)
        error = failure[1] if failure else None
        running = self.running.get(stream)
        if running is not None:
            return _status("running", running, running.request_id, error)
        if failure is not None:
            request = failure[0]
            if request.deployment is not None:
                return _status("failed", request.deployment, request.id, error)
            return NNStatus(state="failed", request_id=request.id, error=error)
        return NNStatus(state="none")

    def _publish_status(self) -> None:
        now = time.time()
        summary: dict[str, NNSummary] = {}
        for stream in self.camera.streams:
            status = self._nn_status(stream)
            if status != self._published_nn.get(stream):
                self._published_nn[stream] = status
                self._reporter.nn_status(self.mxid, stream, _stamped(status, now))
            summary[stream] = NNSummary(
                state=status.state,
                type=type(status.nn_config).__struct_config__.tag  # type: ignore[arg-type]
                if status.nn_config is not None
                else None,
                model_sha256=status.model.sha256 if status.model else None,
                model_name=status.model.name if status.model else None,
            )
        camera = CameraStatus(
            state=self.state,
            name=self.camera.name,
            streams=self.camera.streams,
            nn=summary,
            restarts=self.restarts,
            last_error=self._last_error,
        )
        if camera != self._published_camera:
            self._published_camera = camera
            self._reporter.camera_status(
                self.mxid, msgspec.structs.replace(_stamped(camera, now), stats=self.camera.stats)
            )
            self._reporter.camera_availability(self.mxid, self.state != "offline")


def type_name(deployment: Deployment) -> str:
    return str(type(deployment.nn_config).__struct_config__.tag)


def _merge(target: dict[str, Deployment], batch: Mapping[str, Request]) -> None:
    for stream, request in batch.items():
        if request.deployment is None:
            target.pop(stream, None)
        else:
            target[stream] = request.deployment


def _stamped(status: _S, now: float) -> _S:
    return msgspec.structs.replace(status, updated_at=now)


def _status(
    state: NNStateName,
    deployment: Deployment,
    request_id: str,
    error: ErrorInfo | None = None,
) -> NNStatus:
    return NNStatus(
        state=state,
        model=ModelRef(
            sha256=deployment.model.sha256,
            size=deployment.model.size,
            name=deployment.model_name,
        ),
        nn_config=deployment.nn_config,
        labels=deployment.labels,
        request_id=request_id,
        error=error,
    )


def _same_networks(a: Mapping[str, Deployment], b: Mapping[str, Deployment]) -> bool:
    return a.keys() == b.keys() and all(a[s].same_network(b[s]) for s in a)
