"""All camera workers, the record of requests, and the desired state they persist."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import anyio
import structlog

from agent.cameras.base import Deployment
from agent.errors import AgentError, Interrupted
from agent.messages import Event
from agent.mqtt import ReplyTo
from agent.requests import Request, RequestLog
from agent.state import (
    CameraState,
    StateDocument,
    StoredDeployment,
    StoredReply,
    StoredRequest,
)
from agent.worker import CameraWorker, error_info

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from agent.cameras.base import Camera
    from agent.models import ModelStore
    from agent.reporter import Reporter
    from agent.state import StateFile
    from agent.topics import Topics

__all__ = ["Coordinator"]

log = structlog.get_logger(__name__)

_RETRY_WRITE_SECONDS: Final = 5.0


def _stored(deployment: Deployment) -> StoredDeployment:
    return StoredDeployment(
        sha256=deployment.model.sha256,
        size=deployment.model.size,
        nn_config=deployment.nn_config,
        labels=deployment.labels,
        model_name=deployment.model_name,
        request_id=deployment.request_id,
    )


class Coordinator:
    def __init__(
        self, reporter: Reporter, topics: Topics, *, state: StateFile, store: ModelStore
    ) -> None:
        self._reporter = reporter
        self._topics = topics
        self._state = state
        self._store = store
        self.workers: dict[str, CameraWorker] = {}
        self.requests = RequestLog()
        self._saved: dict[str, CameraState] = {}  # cameras not (yet) present in this run
        self._task_group: TaskGroup | None = None
        self._write_failing = False
        self._write_retry = anyio.Event()
        # events to publish once the next state write (which records them) is done
        self._held: list[tuple[Event, list[ReplyTo]]] = []

    # --- start-up ------------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file: answer interrupted requests, remember what cameras ran."""
        document, problem = self._state.load()
        if problem is not None:
            log.error("state file unusable, starting empty", problem=problem)
            self._reporter.agent_error("state_unreadable", problem)
        self._saved = dict(document.cameras)
        for outcome in document.outcomes:
            self.requests.add(self._recorded(outcome))
        for stored in document.in_flight:
            self._interrupted(stored)

    def _recorded(self, outcome: Event) -> Request:
        return Request(
            id=outcome.request_id,
            action=outcome.action,
            camera=outcome.camera,
            stream=outcome.stream,
            events=[outcome],
        )

    def _interrupted(self, stored: StoredRequest) -> None:
        error = Interrupted(
            "the agent stopped before this request finished; the camera "
            "is brought to the accepted desired state after the restart"
        )
        event = Event(
            request_id=stored.request_id,
            action="deploy" if stored.action == "deploy" else "delete",
            camera=stored.camera,
            stream=stored.stream,
            state="failed",
            ts=time.time(),
            error=error_info(error),
        )
        replies = [ReplyTo(r.topic, r.correlation_data) for r in stored.replies]
        log.warning("interrupted request answered", request_id=stored.request_id)
        self._hold(event, replies)
        self.requests.add(self._recorded(event))

    async def _restore(self, worker: CameraWorker) -> None:
        saved = self._saved.get(worker.mxid)
        if saved is None:
            return
        running = await self._resolve(worker.mxid, saved.last_good)
        desired = await self._resolve(worker.mxid, saved.desired)
        changes = [
            Request(
                id=item.request_id if item else "restore",
                action="deploy" if item else "delete",
                camera=worker.mxid,
                stream=stream,
                deployment=desired.get(stream),
                silent=True,
            )
            for stream in sorted(saved.last_good.keys() | saved.desired.keys())
            if (item := saved.desired.get(stream)) != saved.last_good.get(stream)
            and (item is None or stream in desired)
        ]
        log.info(
            "camera state restored",
            camera=worker.mxid,
            running=sorted(running),
            converging=[c.stream for c in changes],
        )
        worker.restore(running, changes)
        del self._saved[worker.mxid]  # only now: until here the snapshot keeps the saved copy

    async def _resolve(
        self, camera: str, stored: dict[str, StoredDeployment]
    ) -> dict[str, Deployment]:
        resolved = {}
        for stream, item in stored.items():
            try:
                model = await self._store.get(item.sha256)
            except AgentError as exc:
                message = f"cannot restore {camera}/{stream}: {exc.message}"
                log.error("model missing from the store", camera=camera, stream=stream)  # noqa: TRY400
                self._reporter.agent_error(exc.code, message)
                continue
            resolved[stream] = Deployment(
                model=model,
                nn_config=item.nn_config,
                labels=item.labels,
                model_name=item.model_name,
                request_id=item.request_id,
            )
        return resolved

    # --- cameras -------------------------------------------------------------------------

    def add_camera(self, camera: Camera) -> CameraWorker:
        worker = self.workers.get(camera.mxid)
        if worker is None:
            worker = CameraWorker(
                camera, self._reporter, self._topics, changed=self.persist, hold=self._hold
            )
            self.workers[camera.mxid] = worker
            if self._task_group is not None:
                self._start(self._task_group, worker)
        return worker

    def _start(self, tg: TaskGroup, worker: CameraWorker) -> None:
        tg.start_soon(self._run_worker, worker, name=f"camera[{worker.mxid}].worker")

    async def _run_worker(self, worker: CameraWorker) -> None:
        try:
            await self._restore(worker)
        finally:
            worker.restored.set()
        await worker.run()

    # --- requests ------------------------------------------------------------------------

    async def submit(self, request: Request) -> None:
        """Accept a validated request: persisted before `accepted` is announced."""
        worker = self.workers[request.camera]
        # a request staged before the saved state is taken over would not be persisted
        await worker.restored.wait()
        worker.check_accepting()
        self.requests.add(request)
        if not worker.needs_apply(request):
            worker.settle_now(request)
            await self.persist()
            return
        worker.stage(request)
        await self.persist()
        worker.announce(request)

    def _hold(self, event: Event, replies: list[ReplyTo]) -> None:
        self._held.append((event, replies))

    def is_held(self, event: Event) -> bool:
        """True while `event` waits for the state write that records it."""
        return any(held is event for held, _ in self._held)

    # --- persistence ---------------------------------------------------------------------

    def snapshot(self) -> StateDocument:
        cameras = dict(self._saved)
        in_flight: list[StoredRequest] = []
        for mxid, worker in self.workers.items():
            if mxid in self._saved:  # not restored yet
                continue
            cameras[mxid] = CameraState(
                desired={s: _stored(d) for s, d in worker.desired().items()},
                last_good={s: _stored(d) for s, d in worker.running.items()},
            )
            in_flight.extend(
                StoredRequest(
                    request_id=r.id,
                    action=r.action,
                    camera=r.camera,
                    stream=r.stream,
                    replies=tuple(StoredReply(x.topic, x.correlation_data) for x in r.replies),
                )
                for r in worker.in_flight()
            )
        outcomes = tuple(r.last for r in self.requests if r.done and r.last is not None)
        return StateDocument(cameras=cameras, in_flight=tuple(in_flight), outcomes=outcomes)

    def referenced_models(self) -> set[str]:
        document = self.snapshot()
        return {
            item.sha256
            for camera in document.cameras.values()
            for items in (camera.desired, camera.last_good)
            for item in items.values()
        }

    async def persist(self) -> None:
        """Write the state file; on failure report it, keep serving, and retry later.

        Held events go out once the write that records them is done, or has failed (then
        the agent serves from memory and cannot do better).
        """
        held: list[tuple[Event, list[ReplyTo]]] = []

        def snapshot() -> StateDocument:
            held.extend(self._held)  # what this snapshot records
            self._held.clear()
            return self.snapshot()

        try:
            await self._state.save(snapshot)
        except OSError as exc:
            if not self._write_failing:
                message = f"cannot write {self._state.path}: {exc.strerror or exc}"
                log.error("state write failed; serving from memory", error=message)  # noqa: TRY400
                self._reporter.agent_error("state_write_failed", message)
            self._write_failing = True
            self._write_retry.set()
            return
        finally:
            for event, replies in held:
                self._reporter.event(event, replies)
        if self._write_failing:
            log.info("state write recovered", path=str(self._state.path))
            self._write_failing = False
        await self._store.prune(self.referenced_models())

    async def _retry_writes(self) -> None:
        while True:
            await self._write_retry.wait()
            self._write_retry = anyio.Event()
            await anyio.sleep(_RETRY_WRITE_SECONDS)
            if self._write_failing:
                await self.persist()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        if self._held:
            await self.persist()  # record the `interrupted` answers: sent once, not per start
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            tg.start_soon(self._retry_writes, name="state.retry")
            for worker in self.workers.values():
                self._start(tg, worker)
            task_status.started()
