"""All camera workers, the record of requests, and the state writes that record them.

The one place that turns what the steps of a request's life say (`agent.lifecycle`) into
state writes and published events: a request is `accepted`, and its terminal event goes out,
only once a state write records it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import anyio
import structlog

from agent.audit import outcome_line
from agent.cameras import preflight
from agent.errors import (
    AgentError,
    CameraOffline,
    Internal,
    Interrupted,
    ReplayWindowFull,
    ShuttingDown,
    StateUnreadable,
    StateWriteFailed,
    UnknownCamera,
    UnknownStream,
    error_info,
)
from agent.messages import OutputOptions
from agent.requests import Phase, Request, RequestLog
from agent.state import CameraState, StateDocument, StoredRequest
from agent.topics import MXID_RE, STREAM_RE
from agent.worker import CameraWorker

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskGroup, TaskStatus

    from agent.audit import AuditLog
    from agent.cameras.base import Camera, Deployment
    from agent.messages import Event, ReplyTo
    from agent.models import ModelStore
    from agent.reporter import Reporter
    from agent.requests import Notice
    from agent.state import StateFile, StoredDeployment
    from agent.topics import Topics

__all__ = ["Coordinator"]

log = structlog.get_logger(__name__)

_RETRY_WRITE_SECONDS: Final = 5.0
_FINAL_WRITE_SECONDS: Final = 3.0
_PROGRESS_SECONDS: Final = 1.0  # a `transferring` event at most this often ...
_PROGRESS_SHARE: Final = 10  # ... unless a tenth more of the model came


class Coordinator:
    def __init__(
        self,
        reporter: Reporter,
        topics: Topics,
        *,
        state: StateFile,
        store: ModelStore,
        audit: AuditLog | None = None,
        group_writes: bool = True,
        output: OutputOptions | None = None,
        max_signed_requests: int = 4096,
    ) -> None:
        self._reporter = reporter
        self._output = output if output is not None else OutputOptions()
        self._audit = audit
        self._topics = topics
        self._state = state
        self._store = store
        store.keep_referenced(self.referenced_models)
        self.workers: dict[str, CameraWorker] = {}
        self._max_signed = max_signed_requests
        self.requests = RequestLog(signed_limit=max_signed_requests)
        self._saved: dict[str, CameraState] = {}  # cameras not (yet) present in this run
        self._recorded = StateDocument()  # the document last written, or read at start-up
        self._task_group: TaskGroup | None = None
        # False: each submit waits for its own write (only to measure the old way)
        self._group_writes = group_writes
        self._write_wanted = anyio.Event()
        self._write_done = anyio.Event()  # set when the next write to start is done
        self._write_failing = False
        self._write_retry = anyio.Event()
        # events to publish once the next state write (which records them) is done
        self._held: list[Notice] = []
        self._writing_held: list[Notice] = []  # those of the write under way
        # told once the next write / the write under way has recorded and answered its requests
        self._after_next_write: list[Callable[[], None]] = []
        self._after_this_write: list[Callable[[], None]] = []
        self._closing = False  # set when the coordinator stops: no more writes
        self._closed = anyio.Event()  # set once the last write at shutdown is done

    # --- start-up ------------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file: answer interrupted requests, remember what cameras ran."""
        document, problem = self._state.load()
        if problem is not None:
            log.error("state file unusable, starting empty", problem=problem)
            self._reporter.agent_error(StateUnreadable(problem))
        self._recorded = document
        self._saved = dict(document.cameras)
        for outcome in document.outcomes:
            self.requests.add(
                Request(
                    id=outcome.request_id,
                    action=outcome.action,
                    camera=outcome.camera,
                    stream=outcome.stream,
                    events=[outcome],
                    recorded_before=True,
                    phase=Phase.DONE,
                    keep_until=document.signed_until.get(outcome.request_id),
                    group=outcome.group,
                )
            )
        for stored in document.in_flight:
            self._interrupted(stored, document.signed_until.get(stored.request_id))

    def _interrupted(self, stored: StoredRequest, keep_until: float | None) -> None:
        request = Request(
            id=stored.request_id,
            action=stored.action,
            camera=stored.camera,
            stream=stored.stream,
            replies=list(stored.replies),
            phase=Phase.DONE,
            keep_until=keep_until,
            authenticity=None,  # not kept in the state file: unknown to the audit log
            group=stored.group,
        )
        error = Interrupted(
            "the agent stopped before this request finished; the camera "
            "is brought to the accepted desired state after the restart"
        )
        log.warning("interrupted request answered", request_id=stored.request_id)
        self._held += request.say("failed", error=error_info(error))
        self.requests.add(request)

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
            previous=sorted(saved.previous),
        )
        worker.restore(running, changes, saved.previous)
        del self._saved[worker.mxid]  # only now: until here the snapshot keeps the saved copy

    async def _resolve(
        self, camera: str, stored: dict[str, StoredDeployment]
    ) -> dict[str, Deployment]:
        resolved = {}
        for stream, item in stored.items():
            try:
                model = await self._store.get(item.sha256)
            except AgentError as exc:
                log.error("model missing from the store", camera=camera, stream=stream)  # noqa: TRY400
                self._reporter.agent_error(exc, context=f"cannot restore {camera}/{stream}")
                continue
            resolved[stream] = item.deployment(model, self._output)
        return resolved

    # --- cameras -------------------------------------------------------------------------

    @property
    def saved_cameras(self) -> set[str]:
        """The cameras this run drives and those the state file knows (present or not)."""
        return set(self._saved) | set(self.workers)

    def add_camera(self, camera: Camera) -> CameraWorker:
        worker = self.workers.get(camera.mxid)
        if worker is None:
            worker = CameraWorker(
                camera, self._reporter, self._topics, changed=self.persist, announce=self._announce
            )
            self.workers[camera.mxid] = worker
            if self._task_group is not None:
                self._start(self._task_group, worker)
        return worker

    def presence_changed(self, camera: Camera) -> bool:
        """The camera appeared or went away; True when it is new (adopted while running)."""
        new = camera.mxid not in self.workers
        self.add_camera(camera).presence_changed()
        return new

    def _start(self, tg: TaskGroup, worker: CameraWorker) -> None:
        tg.start_soon(self._run_worker, worker, name=f"camera[{worker.mxid}].worker")

    async def _run_worker(self, worker: CameraWorker) -> None:
        try:
            await self._restore(worker)
        finally:
            worker.restored.set()
        await worker.run()

    # --- what the command boundary asks ----------------------------------------------------

    def check_target(self, camera: str, stream: str) -> None:
        """Raise UnknownCamera or UnknownStream unless `camera` has `stream`."""
        worker = self.workers.get(camera) if MXID_RE.fullmatch(camera) else None
        if worker is None:
            raise UnknownCamera(camera=camera)
        streams = worker.camera.streams
        if not STREAM_RE.fullmatch(stream) or stream not in streams:
            raise UnknownStream(camera=camera, stream=stream, available=streams)

    def check_runnable(self, camera: str, stream: str, deployment: Deployment) -> None:
        """Raise IncompatibleModel when `deployment` cannot run there beside what runs now."""
        worker = self.workers[camera]
        preflight.check(
            worker.camera.features,
            stream,
            deployment,
            camera=camera,
            others=worker.running,
        )

    def replay(
        self, request_id: str, camera: str, reply: ReplyTo | None, *, resent: bool = False
    ) -> bool:
        """Answer a repeated request_id for `camera` from the record; False when it is new.

        `resent`: the transport's own second delivery of a command (MQTT DUP) whose answer
        this agent has already sent (or holds): answered once is enough.
        """
        known = self.requests.get(request_id, camera)
        if known is None or known.last is None:
            return False
        if reply is not None and reply not in known.replies:
            known.replies.append(reply)
        if resent and not known.recorded_before:
            log.info("command sent again by the broker, answered already", state=known.last.state)
            return True
        log.info("duplicate request_id, replaying its outcome", state=known.last.state)
        if self.is_held(known.last):
            return True  # goes out, to the new reply too, once the state file records it
        self._reporter.event(known.last, [reply] if reply else [], replay=True)
        return True

    # --- requests ------------------------------------------------------------------------

    async def submit(self, request: Request) -> None:
        """Take a validated request in: it is `accepted` once a state write records it.

        Returns once the request is staged: the next command is handled while the write
        is under way, and one write records every command staged meanwhile. A write that
        fails refuses them (`rejected`, `state_write_failed`) and changes nothing.
        """
        if self._closing:  # no write would record it
            raise ShuttingDown
        worker = self.workers[request.camera]
        # a request staged before the saved state is taken over would not be persisted
        await worker.restored.wait()
        if self._closing:  # it stopped meanwhile: its last write may have been taken already
            raise ShuttingDown
        if not worker.camera.present:
            raise CameraOffline(camera=request.camera)
        known = self.requests.get(request.id, request.camera)
        if known is not None and known.phase is Phase.STAGED:  # the same id, not yet written
            known.replies.extend(r for r in request.replies if r not in known.replies)
            return
        if request.keep_until is not None:
            wait = self.requests.signed_room(time.time())
            if wait is not None:
                raise ReplayWindowFull(limit=self._max_signed, retry_after=wait)
        self.requests.add(request)
        worker.slots.stage(request)
        if self._group_writes:
            self._write_wanted.set()
        else:  # one write per command, the next command waiting for it: the old way
            await self.persist()

    def when_recorded(self, then: Callable[[], None]) -> None:
        """Call `then` once every request submitted so far is recorded (or refused) and answered.

        The MQTT link acknowledges a command only then: a crash before the state write that
        records it leaves the command unacknowledged, and the broker sends it again.
        """
        if any(worker.slots.has_unwritten() for worker in self.workers.values()):
            self._after_next_write.append(then)
        elif any(worker.slots.has_staged() for worker in self.workers.values()):
            self._after_this_write.append(then)
        else:
            then()

    async def closed(self) -> None:
        """Return once the coordinator stopped and its last state write is done."""
        await self._closed.wait()

    def _announce(self, said: list[Notice]) -> None:
        """Publish what a step said; answers go out once the next state write records them."""
        for notice in said:
            if notice.event.terminal:
                self._held.append(notice)
            else:
                self._reporter.event(notice.event, notice.request.replies)

    def is_held(self, event: Event) -> bool:
        """True while `event` waits for the state write that records it."""
        return any(held is event for held, _ in (*self._held, *self._writing_held))

    # --- persistence ---------------------------------------------------------------------

    def _document(self, *, final: bool = False) -> StateDocument:
        """The document to write; `final`: at shutdown, when held answers may not go out."""
        cameras = dict(self._saved)
        in_flight: list[Request] = []
        for mxid, worker in self.workers.items():
            if mxid in self._saved:  # not restored yet
                continue
            slots = worker.slots
            cameras[mxid] = CameraState.of(slots.desired(), slots.last_good(), slots.previous())
            in_flight.extend(worker.slots.in_flight())
        outcomes: list[Request] = []
        for request in self.requests:
            last = request.last
            if last is None or not last.terminal:
                continue
            if final and self.is_held(last):
                in_flight.append(request)  # answered `interrupted` after the restart
            else:
                outcomes.append(request)
        now = time.time()
        signed_until = {
            r.id: r.keep_until
            for r in (*outcomes, *in_flight)
            if r.keep_until is not None and r.keep_until >= now
        }
        return StateDocument(
            cameras=cameras,
            in_flight=tuple(StoredRequest.of(r) for r in in_flight),
            outcomes=tuple(r.events[-1] for r in outcomes),
            signed_until=signed_until,
        )

    def referenced_models(self) -> set[str]:
        """Models the state file names, a request holds or a stream ran before its current
        one: the store keeps them."""
        held = (d for worker in self.workers.values() for d in worker.slots.deployments())
        before = (s for worker in self.workers.values() for s in worker.slots.previous().values())
        return self._recorded.models() | {d.model.sha256 for d in held} | set(before)

    def models_in_use(self) -> dict[str, list[str]]:
        """sha256 -> the "mxid/stream" that run the model or are to run it."""
        used: dict[str, list[str]] = {}
        for mxid, worker in self.workers.items():
            slots = worker.slots
            for stream, deployment in (*slots.running.items(), *slots.desired().items()):
                where = f"{mxid}/{stream}"
                names = used.setdefault(deployment.model.sha256, [])
                if where not in names:
                    names.append(where)
        return used

    def models_kept(self) -> dict[str, list[str]]:
        """sha256 -> the "mxid/stream" that ran the model before their current one."""
        kept: dict[str, list[str]] = {}
        for mxid, worker in self.workers.items():
            for stream, sha256 in worker.slots.previous().items():
                kept.setdefault(sha256, []).append(f"{mxid}/{stream}")
        return kept

    async def persist(self) -> None:
        """Have the state written; return once a write that starts after this call is done.

        The write may have failed: then it was reported, and is retried every few seconds.
        """
        done = self._write_done
        self._write_wanted.set()
        await done.wait()

    async def _writer(self) -> None:
        """One state write at a time, each recording everything staged or held until it starts."""
        while True:
            await self._write_wanted.wait()
            self._write_wanted = anyio.Event()
            done, self._write_done = self._write_done, anyio.Event()
            with anyio.CancelScope(shield=True):  # a write begun is finished and answered
                await self._write()
            done.set()

    async def _write(self) -> None:
        """Write the state; publish what it recorded, or refuse the requests it would accept.

        Held answers go out only after a write that records them: while writes fail they
        wait (and are retried), so no answer is ever undone by a restart.
        """
        prepared: list[CameraWorker] = []
        accepted: list[Notice] = []  # what the requests this write takes in say
        earlier: list[Notice] = []  # answers held for it
        built: list[StateDocument] = []

        def document() -> StateDocument:
            for worker in self.workers.values():
                accepted.extend(worker.slots.prepare())
            prepared.extend(w for w in self.workers.values() if w.slots.in_write())
            earlier.extend(self._held)
            self._held.clear()
            self._writing_held = [*earlier, *accepted]  # what this document records
            self._after_this_write, self._after_next_write = self._after_next_write, []
            built.append(self._document())
            return built[0]

        try:
            await self._state.save(document)
        except OSError as exc:
            self._write_failed(exc, prepared, earlier)
            _call(self._take_told())  # refused, and told so
            return
        finally:
            self._writing_held = []
        self._recorded = built[0]
        told = self._take_told()
        for worker in prepared:
            worker.commit()
            self._fetch(worker)
        for event, request in (*earlier, *accepted):
            self._reporter.event(event, request.replies)
            self._audit_outcome(event, request)
        _call(told)
        if self._write_failing:
            log.info("state write recovered", path=str(self._state.path))
            self._write_failing = False

    # --- requests waiting for their model ------------------------------------------------

    def _fetch(self, worker: CameraWorker) -> None:
        """Get the model of each request that began waiting for it, in a task of its own."""
        for request in worker.slots.transfers():
            if self._task_group is not None:
                self._task_group.start_soon(
                    self._transfer, worker, request, name=f"transfer[{request.id}]"
                )

    async def _transfer(self, worker: CameraWorker, request: Request) -> None:
        """Wait for a request's model, saying how far it came; then stage it, or fail it.

        Cancelled at shutdown, the request stays waiting: the last state write records it
        as unfinished, and it is answered `interrupted` after the restart.
        """
        assert request.acquire is not None  # only such requests wait
        throttle = _Throttle()

        def progress(received: int, total: int | None) -> None:
            if throttle.due(received, total):
                self._announce(worker.slots.progress(request, received, total))

        structlog.contextvars.bind_contextvars(request_id=request.id)
        try:
            deployment = await request.acquire(progress)
            self.check_runnable(worker.mxid, request.stream, deployment)
        except AgentError as exc:
            log.warning("model not had", code=exc.code, error=exc.message)
            self._announce(worker.slots.transfer_failed(request, error_info(exc)))
            self._write_wanted.set()  # its answer goes out once a write records it
            return
        except Exception as exc:
            log.exception("getting the model failed unexpectedly")
            error = error_info(Internal(f"{type(exc).__name__}: {exc}"))
            self._announce(worker.slots.transfer_failed(request, error))
            self._write_wanted.set()
            return
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        if worker.slots.model_arrived(request, deployment):
            self._write_wanted.set()

    def _take_told(self) -> list[Callable[[], None]]:
        told, self._after_this_write = self._after_this_write, []
        return told

    def _take_all_told(self) -> list[Callable[[], None]]:
        told = [*self._after_this_write, *self._after_next_write]
        self._after_this_write, self._after_next_write = [], []
        return told

    def _write_failed(
        self, exc: OSError, prepared: list[CameraWorker], earlier: list[Notice]
    ) -> None:
        refused = [r for worker in prepared for r in worker.slots.roll_back()]
        self._held[:0] = earlier  # answers of finished requests wait for the next write that works
        reason = f"cannot write {self._state.path}: {exc.strerror or exc}"
        if not self._write_failing:  # once per spell; each refused command is told itself
            log.error(  # the reason is enough
                "state write failed", error=reason, refused=len(refused), held=len(self._held)
            )
            self._reporter.agent_error(
                StateWriteFailed(
                    f"{reason}; commands are refused and {len(self._held)} answers wait "
                    f"until it can be written (retried every {_RETRY_WRITE_SECONDS:g} s)"
                )
            )
        self._write_failing = True
        self._write_retry.set()
        error = error_info(StateWriteFailed(f"{reason}; nothing was changed, send it again"))
        for request in refused:
            self.requests.discard(request)
            event = request.event("rejected", error=error)
            self._reporter.event(event, request.replies)
            self._audit_outcome(event, request)

    def _audit_outcome(self, event: Event, request: Request) -> None:
        """A request's terminal event is published: its `outcome` line in the audit log."""
        if self._audit is None or not event.terminal:
            return
        deployment = request.deployment
        line = outcome_line(
            event,
            topic=self._topics.command(request.camera, request.stream, request.action),
            authenticity=request.authenticity,
            model_sha256=None if deployment is None else deployment.model.sha256,
        )
        self._audit.record(line)

    async def _final_write(self) -> None:
        """At shutdown: record what was staged or held as unfinished (`interrupted` later)."""
        told: list[Callable[[], None]] = []

        def document() -> StateDocument:
            # taken with the document: what it records is what is told
            told.extend(self._take_all_told())
            return self._document(final=True)

        if self._held or any(w.slots.has_staged() for w in self.workers.values()):
            try:
                await self._state.save(document)
            except OSError as exc:
                log.error("state write failed at shutdown", error=str(exc))  # noqa: TRY400
                return  # untold: their commands stay unacknowledged, and come again
        else:  # nothing to record: every command handled so far is answered
            told.extend(self._take_all_told())
        _call(told)  # recorded as unfinished: answered `interrupted` after the restart

    async def _retry_writes(self) -> None:
        while True:
            await self._write_retry.wait()
            self._write_retry = anyio.Event()
            await anyio.sleep(_RETRY_WRITE_SECONDS)
            if self._write_failing:
                await self.persist()

    async def _prune_regularly(self) -> None:
        while True:
            await anyio.sleep(self._store.prune_every)  # models past `keep_unreferenced`
            await self._store.prune()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        self._state.make_folder()
        self._store.clean_up()
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._writer, name="state.writer")
                tg.start_soon(self._retry_writes, name="state.retry")
                tg.start_soon(self._prune_regularly, name="models.prune")
                if self._held:
                    await self.persist()  # record the `interrupted` answers: sent once
                await self._store.prune()
                for worker in self.workers.values():
                    self._start(tg, worker)
                task_status.started()
        finally:
            self._closing = True  # a command handled from now on is refused
            with anyio.move_on_after(_FINAL_WRITE_SECONDS, shield=True):
                await self._final_write()
            self._closed.set()


class _Throttle:
    """`transferring` events: the first, then after 1 s or 10 % more, and the last."""

    def __init__(self) -> None:
        self._at: float | None = None
        self._received = 0

    def due(self, received: int, total: int | None) -> bool:
        now = time.monotonic()
        if self._at is not None and received <= self._received:
            return False  # nothing new
        first = self._at is None
        last = total is not None and received >= total
        step = total is not None and received - self._received >= total / _PROGRESS_SHARE
        later = self._at is not None and now - self._at >= _PROGRESS_SECONDS
        if not (first or last or step or later):
            return False
        self._at, self._received = now, received
        return True


def _call(callbacks: list[Callable[[], None]]) -> None:
    for then in callbacks:
        then()
