"""Per-camera serialisation of deploy/delete: one worker owns each camera.

A command changes a camera's desired NN set; the worker applies everything queued with one
restart and reports the outcome to every request the restart included. A deploy replaced
by a later queued command for the same stream ends `superseded`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
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
    from collections.abc import Mapping

    from agent.cameras.base import Camera, Deployment
    from agent.mqtt import ReplyTo
    from agent.reporter import Reporter
    from agent.topics import Topics

__all__ = ["CameraWorker", "Coordinator", "Request"]

log = structlog.get_logger(__name__)

_S = TypeVar("_S", NNStatus, CameraStatus)
_RETRY_MAX: Final = 60.0
_REQUEST_LOG_SIZE: Final = 1000


def error_info(exc: AgentError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, message=exc.message)


@dataclass(eq=False)
class Request:
    """One accepted command and everything said about it."""

    id: str
    action: Literal["deploy", "delete"]
    camera: str
    stream: str
    deployment: Deployment | None = None
    replies: list[ReplyTo] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def last(self) -> Event | None:
        return self.events[-1] if self.events else None


class RequestLog:
    """Recent requests by id, so a repeated request_id is answered from the record."""

    def __init__(self, size: int = _REQUEST_LOG_SIZE) -> None:
        self._size = size
        self._requests: OrderedDict[str, Request] = OrderedDict()

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add(self, request: Request) -> None:
        self._requests[request.id] = request
        while len(self._requests) > self._size:
            self._requests.popitem(last=False)


class CameraWorker:
    """Owns one camera: applies its desired NN set and reports every state change."""

    def __init__(self, camera: Camera, reporter: Reporter, topics: Topics) -> None:
        self.camera = camera
        self._reporter = reporter
        self._topics = topics
        self.running: dict[str, Deployment] = {}
        self._pending: dict[str, Request] = {}
        self._applying: dict[str, Request] = {}
        self._failures: dict[str, tuple[Request, ErrorInfo]] = {}
        self._booted = False
        self._boot_failures = 0
        self.state: Literal["online", "restarting", "offline"] = "offline"
        self.restarts = 0
        self._last_error: ErrorInfo | None = None
        self._wake = anyio.Event()
        self._published_nn: dict[str, NNStatus] = {}
        self._published_camera: CameraStatus | None = None

    @property
    def mxid(self) -> str:
        return self.camera.mxid

    # --- called by the command handler ---------------------------------------------------

    def submit(self, request: Request) -> None:
        """Accept a validated request into the desired set; raise CameraOffline."""
        if not self.camera.present:
            raise CameraOffline(camera=self.mxid)
        prior = self._pending.pop(request.stream, None)
        if prior is not None:
            self._emit(prior, "superseded", superseded_by=request.id)
        self._emit(request, "accepted")
        if self._booted and request.stream not in self._applying and self._no_change(request):
            self._settle(request)
        else:
            self._pending[request.stream] = request
            self._wake.set()
        self._publish_status()

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
                continue
            if self._boot_failures > 1:  # the first retry (the rollback) goes at once
                delay = min(_RETRY_MAX, 2.0 ** (self._boot_failures - 2))
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if not self.camera.present:
                    continue
            await self._apply()

    def _has_work(self) -> bool:
        if not self.camera.present:
            return self.state != "offline" or bool(self._pending)
        return not self._booted or bool(self._pending)

    def _no_change(self, request: Request) -> bool:
        running = self.running.get(request.stream)
        if request.deployment is None:
            return running is None
        return request.deployment.same_network(running)

    def _settle(self, request: Request) -> None:
        """Finish a request whose change needs no restart (host-side fields may change)."""
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
        for stream, request in batch.items():
            if request.deployment is None:
                target.pop(stream, None)
            else:
                target[stream] = request.deployment
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
            self._applying = {}
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
        error = CameraOffline(camera=self.mxid)
        for request in pending.values():
            self._emit(request, "failed", error=error_info(error))
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
                type=_type_name(deployment),
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
    ) -> None:
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
                type=_type_of(status),
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


def _stamped(status: _S, now: float) -> _S:
    return msgspec.structs.replace(status, updated_at=now)


def _type_name(deployment: Deployment) -> str:
    return type(deployment.nn_config).__struct_config__.tag  # type: ignore[return-value]


def _type_of(status: NNStatus) -> str | None:
    if status.nn_config is None:
        return None
    return type(status.nn_config).__struct_config__.tag  # type: ignore[return-value]


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


class Coordinator:
    """All camera workers, and the record of recent requests."""

    def __init__(self, reporter: Reporter, topics: Topics) -> None:
        self._reporter = reporter
        self._topics = topics
        self.workers: dict[str, CameraWorker] = {}
        self.requests = RequestLog()
        self._task_group: anyio.abc.TaskGroup | None = None

    def add_camera(self, camera: Camera) -> CameraWorker:
        worker = self.workers.get(camera.mxid)
        if worker is None:
            worker = CameraWorker(camera, self._reporter, self._topics)
            self.workers[camera.mxid] = worker
            if self._task_group is not None:
                self._task_group.start_soon(worker.run, name=f"camera[{camera.mxid}].worker")
        return worker

    def submit(self, request: Request) -> None:
        worker = self.workers[request.camera]
        worker.submit(request)
        self.requests.add(request)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for worker in self.workers.values():
                tg.start_soon(worker.run, name=f"camera[{worker.mxid}].worker")
            task_status.started()
            await anyio.sleep_forever()
