"""The command boundary: a received message in, a validated request or a `rejected` event out.

Transport-neutral: messages come as `agent.inbox.Inbound`, from `agent.intake.Intake`, which
runs each camera's messages in arrival order (`lane`) and different cameras concurrently.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread
import structlog

from agent.cameras.base import Deployment
from agent.errors import (
    AgentError,
    Expired,
    Internal,
    InvalidPayload,
    PayloadTooLarge,
    RetainedCommand,
    ShuttingDown,
    UnknownCamera,
    clip,
    echo,
    error_info,
)
from agent.groups import select
from agent.intake import ALL_LANES
from agent.messages import (
    DeleteCommand,
    Deploy,
    Event,
    ModelByHash,
    ModelUpload,
    ModelUrl,
    OutputOptions,
    ReplyTo,
    decode_delete,
    decode_deploy,
    decode_group_delete,
    decode_group_deploy,
    decode_objects,
    salvage_request_id,
)
from agent.requests import Request
from agent.signing import UNSIGNED, Authenticity, Policy, Signature, find_signature
from agent.topics import CommandTopic, GroupCommandTopic, SimulatorTopic, StatsRequest

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.audit import AuditLog, Received
    from agent.cameras.simulator import SimulatorBackend
    from agent.coordinator import Coordinator
    from agent.errors import ErrorInfo
    from agent.inbox import Inbound
    from agent.models import ModelStore, StoredModel
    from agent.reporter import Reporter
    from agent.requests import Acquire
    from agent.topics import Topics
    from agent.transfers import Transfers
    from agent.vocab import RequestState

__all__ = ["CommandHandler"]


def _nothing() -> None:
    """Nothing to say: another record answers it."""


log = structlog.get_logger(__name__)

_VERIFY_INLINE_BYTES: Final = 1024 * 1024  # larger signed payloads are verified in a thread
_HASH_IN_TASK_ABOVE: Final = 64 * 1024  # payload bytes hashed for the audit log beside the rest


def _reply_to(message: Inbound, topics: Topics) -> ReplyTo | None:
    """The MQTT 5 Response Topic to copy events to; raise InvalidPayload for an unusable one."""
    topic = message.response_topic
    if not topic:
        return None
    if "+" in topic or "#" in topic or "\0" in topic:
        raise InvalidPayload(f"Response Topic {echo(topic)} must not contain wildcards or NUL")
    if topics.in_prefix(topic):
        # its replies could land on a command topic of this agent or another (a relay)
        raise InvalidPayload(
            f"Response Topic {echo(topic)} must not be under {topics.prefix}/: "
            "replies go outside the agents' topics"
        )
    return ReplyTo(topic=topic, correlation_data=message.correlation_data)


@dataclass(slots=True)
class _GroupReply:
    """What every answer to one group command carries."""

    topic: GroupCommandTopic
    request_id: str
    stream: str = ""  # known once the target is decoded
    replies: list[ReplyTo] = field(default_factory=list)
    authenticity: Authenticity = UNSIGNED
    keep_until: float | None = None  # signed: its expires_at
    # its one `received` line in the audit log (camera ""); each camera's request adds its
    # `outcome` line like any request
    received: Received | None = None
    audited: bool = False  # the received line is recorded
    member_error: ErrorInfo | None = None  # the last camera's refusal


class CommandHandler:
    """Validates each camera's commands in arrival order and hands them to the coordinator."""

    def __init__(
        self,
        *,
        topics: Topics,
        coordinator: Coordinator,
        store: ModelStore,
        reporter: Reporter,
        max_payload_bytes: int,
        simulator: SimulatorBackend | None = None,
        transfers: Transfers | None = None,
        output: OutputOptions | None = None,
        stats_requested: Callable[[], None] | None = None,
        policy: Policy | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._topics = topics
        self._audit = audit
        self._policy = policy if policy is not None else Policy()
        self._coordinator = coordinator
        self._store = store
        self._reporter = reporter
        self._max_payload = max_payload_bytes
        self._simulator = simulator
        self._transfers = transfers  # models on their way: uploads, downloads
        self._output = output if output is not None else OutputOptions()
        self._stats_requested = stats_requested

    def lane(self, message: Inbound) -> str:
        """A camera's commands (and simulator knobs) go in one lane: the camera's id; a group
        command may span every camera, so it goes after all before it and before all after."""
        parsed = self._topics.parse(message.topic)
        if isinstance(parsed, CommandTopic | SimulatorTopic):
            return parsed.camera
        if isinstance(parsed, GroupCommandTopic):
            return ALL_LANES
        return ""  # ignored by `handle`

    async def handle(self, message: Inbound) -> Callable[[], None] | None:
        """Handle one message. None when it is answered already (rejected, or no command);
        when its answer waits for a state write (submitted, or a replay), how to answer it
        should no write ever record it (`rejected`/`shutting_down`; nothing for a replay)."""
        parsed = self._topics.parse(message.topic)
        if isinstance(parsed, CommandTopic):
            return await self._command(parsed, message)
        if isinstance(parsed, GroupCommandTopic):
            return await self._group(parsed, message)
        if isinstance(parsed, SimulatorTopic):
            received = self._received(message, parsed.fault, parsed.camera, None)
            if received is not None:
                await received.hash(message.payload)
            self._fault(parsed, message, received)
        elif isinstance(parsed, StatsRequest):
            self._stats(message)
        return None

    def refuse(self, message: Inbound) -> None:
        """Answer a command received too late to be handled: the agent is stopping."""
        topic = self._topics.parse(message.topic)
        if not isinstance(topic, CommandTopic | GroupCommandTopic):
            return
        try:
            reply = _reply_to(message, self._topics)
        except AgentError:
            reply = None
        payload = message.payload
        try:  # an envelope's request_id is inside it
            signature = find_signature(payload, message.user_properties)
        except AgentError:
            signature = None
        if signature is not None:
            payload = signature.payload
        if isinstance(topic, GroupCommandTopic):
            request_id = self._salvage(payload) or f"auto-{uuid.uuid4().hex}"
            to = _GroupReply(topic, request_id, replies=[reply] if reply else [])
            to.received = self._received(message, topic.action, "", None)
            if to.received is not None:
                to.received.hash_now(message.payload)
            self._say_group(to, "", "rejected", ShuttingDown())
            return
        event = self._reject(topic, payload, reply, ShuttingDown())
        received = self._received(message, topic.action, topic.camera, topic.stream)
        if received is not None:
            received.request_id = event.request_id
            received.hash_now(message.payload)
            received.record_now("rejected", error=event.error)

    def _received(
        self, message: Inbound, action: str, camera: str, stream: str | None
    ) -> Received | None:
        """The audit record of a command received; None when there is no audit log."""
        if self._audit is None:
            return None
        return self._audit.received(
            topic=message.topic,
            action=action,
            camera=camera,
            stream=stream,
            payload_bytes=len(message.payload),
        )

    async def _command(self, topic: CommandTopic, message: Inbound) -> Callable[[], None] | None:
        structlog.contextvars.bind_contextvars(camera=clip(topic.camera), stream=clip(topic.stream))
        received = self._received(message, topic.action, topic.camera, topic.stream)
        try:
            async with anyio.create_task_group() as tg:
                if received is not None:  # the exact bytes received, envelope included
                    if len(message.payload) > _HASH_IN_TASK_ABOVE:  # while the model is stored
                        tg.start_soon(received.hash, message.payload, name="audit.hash")
                    else:
                        received.hash_now(message.payload)
                unrecorded = await self._handle_command(topic, message, received)
        finally:
            structlog.contextvars.unbind_contextvars("camera", "stream", "request_id")
        return unrecorded

    async def _handle_command(
        self, topic: CommandTopic, message: Inbound, received: Received | None
    ) -> Callable[[], None] | None:
        payload = message.payload
        reply = None
        authenticity = UNSIGNED
        try:
            reply = _reply_to(message, self._topics)
            self._admit(message)
            signature = find_signature(payload, message.user_properties)
            if signature is not None:
                payload = signature.payload  # the command; an envelope's request_id is in it
                authenticity = Authenticity(signed=True, key_id=None)  # not verified yet
            authenticity = await self._authenticate(message.topic, topic.camera, signature)
            request = await self._validate(
                topic, payload, reply, authenticity, received=received, resent=message.resent
            )
            if request is None:
                return _nothing  # a replay: the original request's record answers it
            if received is not None:
                await received.hashed()
            await self._coordinator.submit(request)
            if received is not None:
                # at once: no state write (whose answers bring outcome lines) ran in between
                received.record_now("submitted")
        except AgentError as exc:
            await self._rejected(topic, payload, reply, exc, authenticity, received=received)
        except Exception as exc:
            log.exception("command failed unexpectedly")
            error = Internal(f"{type(exc).__name__}: {exc}")
            await self._rejected(topic, payload, reply, error, authenticity, received=received)
        else:
            return partial(self._refused_late, request, reply, received)
        return None

    async def _authenticate(
        self, topic: str, camera: str, signature: Signature | None
    ) -> Authenticity:
        """Check the signature, in a thread for a large payload (20 MB: ~50 ms of hashing)."""
        if signature is not None and len(signature.payload) > _VERIFY_INLINE_BYTES:
            return await anyio.to_thread.run_sync(self._policy.check, topic, camera, signature)
        return self._policy.check(topic, camera, signature)

    def _admit(self, message: Inbound) -> None:
        """Refuse what is never looked into: retained, or too large."""
        if message.retain:
            raise RetainedCommand
        if len(message.payload) > self._max_payload:
            raise PayloadTooLarge(size=len(message.payload), limit=self._max_payload)

    async def _validate(
        self,
        topic: CommandTopic,
        payload: bytes,
        reply: ReplyTo | None,
        authenticity: Authenticity,
        *,
        received: Received | None,
        resent: bool = False,
    ) -> Request | None:
        """The accepted request, or None when a repeated request_id was answered instead."""
        command: Deploy | DeleteCommand = (
            decode_deploy(payload) if topic.action == "deploy" else decode_delete(payload)
        )
        now = time.time()
        if authenticity.signed:
            self._policy.check_fresh(command.request_id, command.expires_at, now)
            # before the record: a signed command past its expires_at is never answered
            # from it, so a replay after that is `expired`, however the original ended
            if command.expires_at is not None and now > command.expires_at:
                raise Expired(expires_at=command.expires_at, now=now)
        request_id = command.request_id or f"auto-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(request_id=request_id)
        if received is not None:
            received.authenticity = authenticity
            received.request_id = request_id
            if isinstance(command, Deploy) and isinstance(command.model, ModelByHash):
                received.model_sha256 = command.model.sha256
        if self._coordinator.replay(request_id, topic.camera, reply, resent=resent):
            if received is not None:
                known = self._coordinator.requests.get(request_id, topic.camera)
                last = None if known is None else known.last
                state = None if last is None else last.state
                await received.record("replayed", replayed_state=state)
            return None
        if command.expires_at is not None and now > command.expires_at:
            raise Expired(expires_at=command.expires_at, now=now)
        self._coordinator.check_target(topic.camera, topic.stream)
        deployment = acquire = None
        if isinstance(command, Deploy):
            acquire = self._acquire(command, request_id)
            if acquire is None:
                deployment = await self._deployment(command, request_id)
                # refuse what cannot run before the camera is taken down for it
                self._coordinator.check_runnable(topic.camera, topic.stream, deployment)
            if received is not None:
                # a model on its way is named by its sha256 (by hash, or a model_url)
                received.model_sha256 = (
                    deployment.model.sha256 if deployment is not None else command.model.sha256
                )
        return Request(
            id=request_id,
            action=topic.action,
            camera=topic.camera,
            stream=topic.stream,
            deployment=deployment,
            replies=[reply] if reply else [],
            acquire=acquire,
            authenticity=authenticity,
            keep_until=command.expires_at if authenticity.signed else None,
        )

    def _acquire(self, command: Deploy, request_id: str) -> Acquire | None:
        """How to get a model that is on its way, an upload in progress or a `model_url`
        (accepted now, `transferring` until it is there); None when it is at hand."""
        model, transfers = command.model, self._transfers
        if transfers is None or isinstance(model, ModelUpload) or not transfers.on_its_way(model):
            return None

        async def acquire(progress: Callable[[int, int | None], None]) -> Deployment:
            stored = await transfers.model(model, progress, name=command.model_name)
            progress(stored.size, stored.size)  # all of it (said once, if not said yet)
            return self._deployment_of(command, request_id, stored)

        return acquire

    async def _deployment(self, command: Deploy, request_id: str) -> Deployment:
        model = await self._model(command.model, name=command.model_name)
        return self._deployment_of(command, request_id, model)

    def _deployment_of(self, command: Deploy, request_id: str, model: StoredModel) -> Deployment:
        return Deployment(
            model=model,
            nn_config=command.nn_config,
            labels=command.labels,
            model_name=command.model_name,
            request_id=request_id,
            output=self._output if command.output is None else command.output.over(self._output),
        )

    async def _model(
        self, source: ModelUpload | ModelByHash | ModelUrl, *, name: str | None
    ) -> StoredModel:
        """Hash, store and parse an uploaded model (named `name` in the store's list), or
        find a stored one."""
        match source:
            case ModelUpload(data=data, sha256=expected):
                return await self._store.put(data, expected_sha256=expected, name=name)
            case ModelByHash(sha256=sha256) | ModelUrl(sha256=sha256):
                return await self._store.get(sha256)

    def _reject(
        self,
        topic: CommandTopic,
        payload: bytes,
        reply: ReplyTo | None,
        exc: AgentError,
        authenticity: Authenticity = UNSIGNED,
    ) -> Event:
        request_id = self._salvage(payload) or f"auto-{uuid.uuid4().hex}"
        return self._answer(topic, request_id, reply, exc, authenticity)

    async def _rejected(
        self,
        topic: CommandTopic,
        payload: bytes,
        reply: ReplyTo | None,
        exc: AgentError,
        authenticity: Authenticity,
        *,
        received: Received | None,
    ) -> None:
        """Answer `rejected`; audit it: one received line, final at once."""
        event = self._reject(topic, payload, reply, exc, authenticity)
        if received is None:
            return
        received.authenticity = authenticity
        received.request_id = received.request_id or event.request_id
        await received.record("rejected", error=event.error)

    def _refused_late(
        self, request: Request, reply: ReplyTo | None, received: Received | None
    ) -> None:
        """A submitted command no state write took in (the agent stopped): refused after all."""
        topic = CommandTopic(camera=request.camera, stream=request.stream, action=request.action)
        event = self._answer(topic, request.id, reply, ShuttingDown(), request.authenticity)
        if received is not None:
            received.outcome(event)

    def _answer(
        self,
        topic: CommandTopic,
        request_id: str,
        reply: ReplyTo | None,
        exc: AgentError,
        authenticity: Authenticity | None = UNSIGNED,
    ) -> Event:
        log.warning(
            "command rejected",
            code=exc.code,
            error=exc.message,
            signed=authenticity is not None and authenticity.signed,
            key_id=None if authenticity is None else authenticity.key_id,
        )
        event = Event(
            request_id=request_id,
            action=topic.action,
            camera=topic.camera,
            stream=topic.stream,
            state="rejected",
            ts=time.time(),
            error=error_info(exc),
        )
        self._reporter.event(event, [reply] if reply else [])
        return event

    def _salvage(self, payload: bytes) -> str | None:
        """The request_id to echo in a rejection; never raises, whatever the payload holds."""
        try:
            return salvage_request_id(payload)
        except Exception:  # the rejection path must not fail where the main path did
            log.exception("request_id not recoverable from a rejected payload")
            return None

    def _stats(self, message: Inbound) -> None:
        if message.retain:  # a retained request would fire at every subscribe
            log.warning("retained stats request ignored")
            return
        if self._stats_requested is not None:
            self._stats_requested()

    # --- group commands: `{prefix}/groups/{group}/nn/{action}` ------------------------------

    async def _group(self, topic: GroupCommandTopic, message: Inbound) -> Callable[[], None] | None:
        """A group command: one request per camera its target selects here, all under its
        request_id; `skipped` when it selects none. A problem of the command as a whole is
        one `rejected` with no camera."""
        payload = message.payload
        to = _GroupReply(topic, self._salvage(payload) or f"auto-{uuid.uuid4().hex}")
        structlog.contextvars.bind_contextvars(group=topic.group, request_id=to.request_id)
        to.received = self._received(message, topic.action, "", None)
        if to.received is not None:  # the exact bytes received (in a thread when large)
            await to.received.hash(message.payload)
        try:
            reply = _reply_to(message, self._topics)
            to.replies = [reply] if reply else []
            self._admit(message)
            signature = find_signature(payload, message.user_properties)
            if signature is not None:  # an envelope's request_id is inside it
                payload = signature.payload
                to.request_id = self._salvage(payload) or to.request_id
                structlog.contextvars.bind_contextvars(request_id=to.request_id)
            to.authenticity = await self._authenticate_group(message.topic, signature)
            submitted, replayed = await self._group_requests(to, payload, message.resent)
        except AgentError as exc:
            self._say_group(to, "", "rejected", exc)
            return None
        except Exception as exc:
            log.exception("group command failed unexpectedly")
            self._say_group(to, "", "rejected", Internal(f"{type(exc).__name__}: {exc}"))
            return None
        finally:
            structlog.contextvars.unbind_contextvars("group", "request_id")
        if submitted:
            self._audit_group(to, "submitted")
            return partial(self._refuse_members, to, submitted)
        if replayed:
            self._audit_group(to, "replayed")
            return _nothing  # a replay: a camera's record answers it
        self._audit_group(to, "rejected", to.member_error)  # every selected camera refused
        return None

    def _audit_group(self, to: _GroupReply, state: str, error: ErrorInfo | None = None) -> None:
        """The group command's one `received` line, recorded once."""
        received = to.received
        if received is None or to.audited:
            return
        to.audited = True
        received.authenticity = to.authenticity
        received.request_id = to.request_id
        received.stream = to.stream or None
        received.record_now(state, error=error)

    async def _authenticate_group(self, topic: str, signature: Signature | None) -> Authenticity:
        """The signature of a group command, as `_authenticate` (the cameras come later)."""
        if signature is not None and len(signature.payload) > _VERIFY_INLINE_BYTES:
            return await anyio.to_thread.run_sync(self._policy.check_group, topic, signature)
        return self._policy.check_group(topic, signature)

    async def _group_requests(
        self, to: _GroupReply, payload: bytes, resent: bool
    ) -> tuple[list[Request], bool]:
        """The requests submitted, one per camera, and whether any camera replayed instead."""
        command, target = (
            decode_group_deploy(payload)
            if to.topic.action == "deploy"
            else decode_group_delete(payload)
        )
        to.stream = target.stream
        cameras = select(target, (w.camera for w in self._coordinator.workers.values()))
        if not cameras:
            log.info("group command selects none of this agent's cameras")
            self._say_group(to, "", "skipped")
            return [], False
        now = time.time()
        if to.authenticity.signed:  # as for a command to one camera (see `_validate`)
            self._policy.check_fresh(command.request_id, command.expires_at, now)
            if command.expires_at is not None and now > command.expires_at:
                raise Expired(expires_at=command.expires_at, now=now)
            to.keep_until = command.expires_at
        reply = to.replies[0] if to.replies else None
        fresh = [
            c
            for c in cameras
            if not self._coordinator.replay(to.request_id, c, reply, resent=resent)
        ]
        if not fresh:
            return [], True
        if command.expires_at is not None and now > command.expires_at:
            raise Expired(expires_at=command.expires_at, now=now)
        deployment = acquire = None
        if isinstance(command, Deploy):  # the model is stored (or awaited) once for all
            acquire = self._acquire(command, to.request_id)
            if acquire is None:
                deployment = await self._deployment(command, to.request_id)
            if to.received is not None:  # as for one camera (see `_validate`)
                to.received.model_sha256 = (
                    deployment.model.sha256 if deployment is not None else command.model.sha256
                )
        submitted = []
        for camera in fresh:
            request = await self._member(to, camera, deployment, acquire)
            if request is not None:
                submitted.append(request)
        return submitted, len(fresh) < len(cameras)

    async def _member(
        self,
        to: _GroupReply,
        camera: str,
        deployment: Deployment | None,
        acquire: Acquire | None = None,
    ) -> Request | None:
        """Submit the group command's request for one camera; None when it was rejected.
        A deploy whose model is on its way (`acquire`) waits for it in each camera's slot:
        the cameras share the one upload or download."""
        try:
            self._policy.check_camera(to.authenticity, camera)
            self._coordinator.check_target(camera, to.stream)
            if deployment is not None:
                self._coordinator.check_runnable(camera, to.stream, deployment)
            request = Request(
                id=to.request_id,
                action=to.topic.action,
                camera=camera,
                stream=to.stream,
                deployment=deployment,
                replies=list(to.replies),
                acquire=acquire,
                authenticity=to.authenticity,
                keep_until=to.keep_until,
                group=to.topic.group,
            )
            await self._coordinator.submit(request)
        except AgentError as exc:
            self._say_group(to, camera, "rejected", exc)
        except Exception as exc:
            log.exception("group command failed unexpectedly", camera=camera)
            self._say_group(to, camera, "rejected", Internal(f"{type(exc).__name__}: {exc}"))
        else:
            return request
        return None

    def _refuse_members(self, to: _GroupReply, requests: list[Request]) -> None:
        for request in requests:
            event = self._say_group(to, request.camera, "rejected", ShuttingDown())
            if to.received is not None:
                to.received.outcome(event)

    def _say_group(
        self, to: _GroupReply, camera: str, state: RequestState, exc: AgentError | None = None
    ) -> Event:
        if exc is not None:
            log.warning(
                "group command rejected",
                camera=camera,
                code=exc.code,
                error=exc.message,
                signed=to.authenticity.signed,
                key_id=to.authenticity.key_id,
            )
        event = Event(
            request_id=to.request_id,
            action=to.topic.action,
            camera=camera,
            stream=to.stream,
            state=state,
            ts=time.time(),
            error=None if exc is None else error_info(exc),
            group=to.topic.group,
        )
        self._reporter.event(event, to.replies)
        if not camera:  # an answer of the command as a whole: `rejected` or `skipped`
            self._audit_group(to, state, event.error)
        elif event.error is not None:
            to.member_error = event.error
        return event

    def _fault(self, topic: SimulatorTopic, message: Inbound, received: Received | None) -> None:
        if self._simulator is None:
            return
        if message.retain:
            log.warning("retained simulator command ignored", camera=clip(topic.camera))
            if received is not None:
                received.record_now("ignored", error=error_info(RetainedCommand()))
            return
        try:  # the same rule as for commands: see the README, "Signed commands"
            signature = find_signature(message.payload, message.user_properties)
            authenticity = self._policy.check(message.topic, topic.camera, signature)
        except AgentError as exc:
            log.warning(
                "simulator command refused",
                camera=clip(topic.camera),
                fault=topic.fault,
                code=exc.code,
                error=exc.message,
            )
            if received is not None:
                received.record_now("ignored", error=error_info(exc))
            return
        if received is not None:
            received.authenticity = authenticity
        camera = self._simulator.cameras.get(topic.camera)
        if camera is None:
            log.warning("simulator command for unknown camera", camera=clip(topic.camera))
            if received is not None:
                received.record_now("ignored", error=error_info(UnknownCamera(camera=topic.camera)))
            return
        log.info(
            "simulator fault",
            camera=topic.camera,
            fault=topic.fault,
            signed=authenticity.signed,
            key_id=authenticity.key_id,
        )
        if received is not None:
            received.record_now("executed")
        match topic.fault:
            case "objects":
                # the schedule itself: inside the envelope when it came in one
                payload = signature.payload if signature is not None else message.payload
                try:
                    camera.schedule_objects(decode_objects(payload))
                except InvalidPayload as exc:
                    log.warning("simulator objects refused", error=exc.message)
                    self._reporter.agent_error(exc, context=f"simulator objects for {topic.camera}")
            case "unplug":
                camera.unplug()
            case "replug":
                camera.replug()
            case "fail_next_boot":
                camera.fail_next_boot()
