"""One worker per camera: applies the desired NN set and reports every state change.

A command changes the camera's desired set; the worker applies everything queued with one
restart and reports the outcome to every request the restart included. A command replaced
by a later queued command for the same stream ends `superseded`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import anyio
import msgspec
import structlog

from agent.errors import AgentError, CameraOffline, Internal
from agent.messages import (
    CameraStatus,
    ErrorInfo,
    Event,
    ModelRef,
    NNStatus,
    NNSummary,
    RequestState,
)
from agent.reporter import Route

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from agent.cameras.base import Camera, Deployment
    from agent.mqtt import ReplyTo
    from agent.reporter import Reporter
    from agent.requests import Request
    from agent.topics import Topics

__all__ = ["CameraWorker", "error_info"]

log = structlog.get_logger(__name__)

_S = TypeVar("_S", NNStatus, CameraStatus)
_RETRY_MAX: Final = 60.0


def error_info(exc: AgentError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, message=exc.message)


class CameraWorker:
    """Owns one camera; nothing else touches it."""

    def __init__(
        self,
        camera: Camera,
        reporter: Reporter,
        topics: Topics,
        *,
        changed: Callable[[], Awaitable[None]],
        hold: Callable[[Event, list[ReplyTo]], None],
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
        self._staged: dict[str, Request] = {}
        self._pending: dict[str, Request] = {}
        self._applying: dict[str, Request] = {}
        self._failures: dict[str, tuple[Request, ErrorInfo]] = {}
        self._booted = False
        self._boot_failures = 0
        self.state: Literal["online", "restarting", "offline"] = "offline"
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
        """The NN set once every accepted request is applied."""
        target = dict(self.running)
        for batch in (self._applying, self._pending, self._staged):
            _merge(target, batch)
        return target

    def in_flight(self) -> list[Request]:
        batches = (self._applying, self._pending, self._staged)
        return [r for batch in batches for r in batch.values() if not r.silent]

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

    def settle_now(self, request: Request) -> None:
        self._supersede(request)
        # held with its outcome: after a crash before the write, nothing was said at all
        self._emit(request, "accepted", hold=True)
        self._settle(request)
        self._publish_status()

    def stage(self, request: Request) -> None:
        """Take the request into the desired set; it is announced once persisted."""
        self._supersede(request)
        self._staged[request.stream] = request

    def announce(self, request: Request) -> None:
        if self._staged.get(request.stream) is request:
            del self._staged[request.stream]
            self._emit(request, "accepted")
            self._pending[request.stream] = request
            self._wake.set()
            self._publish_status()

    def presence_changed(self) -> None:
        if self.camera.present:
            self._booted = False
        self._wake.set()

    def _supersede(self, request: Request) -> None:
        prior = self._pending.pop(request.stream, None)
        if prior is not None:
            self._emit(prior, "superseded", superseded_by=request.id)

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

    def _settle(self, request: Request) -> None:
        """Finish a request whose change runs now (host-side fields may change alone)."""
        if request.deployment is not None:
            self.running[request.stream] = request.deployment
        else:
            self.running.pop(request.stream, None)
        self._failures.pop(request.stream, None)
        self._route(request.stream)
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
            self._hold(event, request.replies)
        else:
            self._reporter.event(event, request.replies)

    def _nn_status(self, stream: str) -> NNStatus:
        request = (
            self._staged.get(stream) or self._pending.get(stream) or self._applying.get(stream)
        )
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
            self._reporter.camera_status(self.mxid, _stamped(camera, now))
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
    state: Literal["deploying", "running", "failed"],
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
