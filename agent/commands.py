"""The command boundary: a received message in, a validated request or a `rejected` event out.

Transport-neutral: messages come as `agent.inbox.Inbound`, from `agent.intake.Intake`, which
runs each camera's messages in arrival order (`lane`) and different cameras concurrently.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import anyio
import structlog

from agent.audit import UNSIGNED, AuditLine, outcome_line
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
from agent.messages import (
    DeleteCommand,
    Deploy,
    Event,
    ModelByHash,
    ModelUpload,
    ReplyTo,
    decode_delete,
    decode_deploy,
    salvage_request_id,
)
from agent.requests import Request
from agent.topics import CommandTopic, SimulatorTopic

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.audit import AuditLog, Authenticity
    from agent.cameras.simulator import SimulatorBackend
    from agent.coordinator import Coordinator
    from agent.inbox import Inbound
    from agent.models import ModelStore, StoredModel
    from agent.reporter import Reporter
    from agent.topics import Topics

__all__ = ["CommandHandler"]


def _nothing() -> None:
    """Nothing to say: another record answers it."""


log = structlog.get_logger(__name__)

_HASH_IN_THREAD_ABOVE: Final = 1024 * 1024  # payload bytes hashed off the event loop


async def _payload_sha256(payload: bytes) -> str:
    if len(payload) > _HASH_IN_THREAD_ABOVE:  # hashlib lets go of the GIL meanwhile
        return await anyio.to_thread.run_sync(_sha256, payload)
    return _sha256(payload)


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@dataclass(slots=True)
class _Seen:
    """What the audit log says about a command received, filled in as it is handled."""

    topic: str
    action: str
    camera: str
    stream: str | None
    payload_sha256: str
    payload_bytes: int
    authenticity: Authenticity
    request_id: str | None = None
    model_sha256: str | None = None

    def line(
        self,
        state: str,
        *,
        error: AgentError | None = None,
        replayed_state: str | None = None,
    ) -> AuditLine:
        return AuditLine(
            ts=time.time(),
            kind="received",
            topic=self.topic,
            action=self.action,
            camera=self.camera,
            stream=self.stream,
            request_id=self.request_id,
            key_id=self.authenticity.key_id,
            signed=self.authenticity.signed,
            payload_sha256=self.payload_sha256,
            payload_bytes=self.payload_bytes,
            model_sha256=self.model_sha256,
            state=state,
            error=None if error is None else error_info(error),
            replayed_state=replayed_state,
        )


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
        audit: AuditLog | None = None,
    ) -> None:
        self._topics = topics
        self._audit = audit
        self._coordinator = coordinator
        self._store = store
        self._reporter = reporter
        self._max_payload = max_payload_bytes
        self._simulator = simulator

    def lane(self, message: Inbound) -> str:
        """A camera's commands (and simulator knobs) go in one lane: the camera's id."""
        parsed = self._topics.parse(message.topic)
        if isinstance(parsed, CommandTopic | SimulatorTopic):
            return parsed.camera
        return ""  # ignored by `handle`

    async def handle(self, message: Inbound) -> Callable[[], None] | None:
        """Handle one message. None when it is answered already (rejected, or no command);
        when its answer waits for a state write (submitted, or a replay), how to answer it
        should no write ever record it (`rejected`/`shutting_down`; nothing for a replay)."""
        parsed = self._topics.parse(message.topic)
        if isinstance(parsed, CommandTopic):
            return await self._command(parsed, message)
        if isinstance(parsed, SimulatorTopic):
            seen = await self._seen(message, parsed.fault, parsed.camera, None)
            self._fault(parsed, message, seen)
        return None

    def refuse(self, message: Inbound) -> None:
        """Answer a command received too late to be handled: the agent is stopping."""
        topic = self._topics.parse(message.topic)
        if not isinstance(topic, CommandTopic):
            return
        try:
            reply = _reply_to(message, self._topics)
        except AgentError:
            reply = None
        seen = self._seen_now(message, topic.action, topic.camera, topic.stream, UNSIGNED)
        self._reject(topic, message.payload, reply, ShuttingDown(), seen)

    async def _seen(
        self,
        message: Inbound,
        action: str,
        camera: str,
        stream: str | None,
        authenticity: Authenticity = UNSIGNED,
    ) -> _Seen | None:
        """The audit record of a command received; None when there is no audit log."""
        if self._audit is None or not self._audit.enabled:
            return None
        return _Seen(
            topic=message.topic,
            action=action,
            camera=camera,
            stream=stream,
            payload_sha256=await _payload_sha256(message.payload),
            payload_bytes=len(message.payload),
            authenticity=authenticity,
        )

    def _seen_now(
        self,
        message: Inbound,
        action: str,
        camera: str,
        stream: str | None,
        authenticity: Authenticity,
    ) -> _Seen | None:
        """`_seen` without waiting: at shutdown, for a command refused unhandled."""
        if self._audit is None or not self._audit.enabled:
            return None
        return _Seen(
            topic=message.topic,
            action=action,
            camera=camera,
            stream=stream,
            payload_sha256=_sha256(message.payload),
            payload_bytes=len(message.payload),
            authenticity=authenticity,
        )

    def _audited(self, seen: _Seen | None, line: Callable[[_Seen], AuditLine]) -> None:
        if seen is not None and self._audit is not None:
            self._audit.record(line(seen))

    async def _command(self, topic: CommandTopic, message: Inbound) -> Callable[[], None] | None:
        payload = message.payload
        reply = None
        structlog.contextvars.bind_contextvars(camera=clip(topic.camera), stream=clip(topic.stream))
        # the signature check (when configured) tells whether and by whom it was signed
        authenticity = UNSIGNED
        seen = await self._seen(message, topic.action, topic.camera, topic.stream, authenticity)
        try:
            reply = _reply_to(message, self._topics)
            request = await self._validate(topic, message.retain, payload, reply, seen)
            if request is None:
                return _nothing  # a replay: the original request's record answers it
            request.authenticity = authenticity
            await self._coordinator.submit(request)
        except AgentError as exc:
            self._reject(topic, payload, reply, exc, seen)
        except Exception as exc:
            log.exception("command failed unexpectedly")
            error = Internal(f"{type(exc).__name__}: {exc}")
            self._reject(topic, payload, reply, error, seen)
        else:
            self._audited(seen, lambda s: s.line("submitted"))
            return partial(self._refused_late, request, reply)
        finally:
            structlog.contextvars.unbind_contextvars("camera", "stream", "request_id")
        return None

    async def _validate(
        self,
        topic: CommandTopic,
        retain: bool,
        payload: bytes,
        reply: ReplyTo | None,
        seen: _Seen | None,
    ) -> Request | None:
        """The accepted request, or None when a repeated request_id was answered instead."""
        if retain:
            raise RetainedCommand
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(size=len(payload), limit=self._max_payload)
        command: Deploy | DeleteCommand = (
            decode_deploy(payload) if topic.action == "deploy" else decode_delete(payload)
        )
        request_id = command.request_id or f"auto-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(request_id=request_id)
        if seen is not None:
            seen.request_id = request_id
            if isinstance(command, Deploy) and isinstance(command.model, ModelByHash):
                seen.model_sha256 = command.model.sha256
        if self._coordinator.replay(request_id, reply):
            self._audited(seen, partial(self._replayed_line, request_id))
            return None
        now = time.time()
        if command.expires_at is not None and now > command.expires_at:
            raise Expired(expires_at=command.expires_at, now=now)
        self._coordinator.check_target(topic.camera, topic.stream)
        deployment = None
        if isinstance(command, Deploy):
            deployment = await self._deployment(command, request_id)
            if seen is not None:
                seen.model_sha256 = deployment.model.sha256
            # refuse what cannot run before the camera is taken down for it
            self._coordinator.check_runnable(topic.camera, topic.stream, deployment)
        return Request(
            id=request_id,
            action=topic.action,
            camera=topic.camera,
            stream=topic.stream,
            deployment=deployment,
            replies=[reply] if reply else [],
        )

    def _replayed_line(self, request_id: str, seen: _Seen) -> AuditLine:
        known = self._coordinator.requests.get(request_id)
        last = None if known is None else known.last
        return seen.line("replayed", replayed_state=None if last is None else last.state)

    async def _deployment(self, command: Deploy, request_id: str) -> Deployment:
        return Deployment(
            model=await self._model(command.model),
            nn_config=command.nn_config,
            labels=command.labels,
            model_name=command.model_name,
            request_id=request_id,
        )

    async def _model(self, source: ModelUpload | ModelByHash) -> StoredModel:
        """Hash, store and parse an uploaded model, or find a stored one."""
        match source:
            case ModelUpload(data=data, sha256=expected):
                return await self._store.put(data, expected_sha256=expected)
            case ModelByHash(sha256=sha256):
                return await self._store.get(sha256)

    def _reject(
        self,
        topic: CommandTopic,
        payload: bytes,
        reply: ReplyTo | None,
        exc: AgentError,
        seen: _Seen | None,
    ) -> None:
        request_id = self._salvage(payload) or f"auto-{uuid.uuid4().hex}"
        if seen is not None and seen.request_id is None:
            seen.request_id = request_id
        self._answer(topic, request_id, reply, exc)
        self._audited(seen, lambda s: s.line("rejected", error=exc))  # final: one line

    def _refused_late(self, request: Request, reply: ReplyTo | None) -> None:
        """A submitted command no state write took in (the agent stopped): refused after all."""
        topic = CommandTopic(camera=request.camera, stream=request.stream, action=request.action)
        event = self._answer(topic, request.id, reply, ShuttingDown())
        if self._audit is not None:
            deployment = request.deployment
            line = outcome_line(
                event,
                topic=self._topics.command(request.camera, request.stream, request.action),
                authenticity=request.authenticity,
                model_sha256=None if deployment is None else deployment.model.sha256,
            )
            self._audit.record(line)

    def _answer(
        self, topic: CommandTopic, request_id: str, reply: ReplyTo | None, exc: AgentError
    ) -> Event:
        log.warning("command rejected", code=exc.code, error=exc.message)
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

    def _fault(self, topic: SimulatorTopic, message: Inbound, seen: _Seen | None) -> None:
        if self._simulator is None:
            return
        if message.retain:
            log.warning("retained simulator command ignored", camera=clip(topic.camera))
            self._audited(seen, lambda s: s.line("ignored", error=RetainedCommand()))
            return
        camera = self._simulator.cameras.get(topic.camera)
        if camera is None:
            log.warning("simulator command for unknown camera", camera=clip(topic.camera))
            error = UnknownCamera(camera=topic.camera)
            self._audited(seen, lambda s: s.line("ignored", error=error))
            return
        log.info("simulator fault", camera=topic.camera, fault=topic.fault)
        self._audited(seen, lambda s: s.line("executed"))
        match topic.fault:
            case "unplug":
                camera.unplug()
            case "replug":
                camera.replug()
            case "fail_next_boot":
                camera.fail_next_boot()
