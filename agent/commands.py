"""The command boundary: a received message in, a validated request or a `rejected` event out.

Transport-neutral: messages come as `agent.inbox.Inbound`, from `agent.intake.Intake`, which
runs each camera's messages in arrival order (`lane`) and different cameras concurrently.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

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
    ReplyTo,
    decode_delete,
    decode_deploy,
    decode_group_delete,
    decode_group_deploy,
    salvage_request_id,
)
from agent.requests import Request
from agent.topics import CommandTopic, GroupCommandTopic, SimulatorTopic

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.cameras.simulator import SimulatorBackend
    from agent.coordinator import Coordinator
    from agent.inbox import Inbound
    from agent.models import ModelStore, StoredModel
    from agent.reporter import Reporter
    from agent.topics import Topics
    from agent.vocab import RequestState

__all__ = ["CommandHandler"]


def _nothing() -> None:
    """Nothing to say: another record answers it."""


log = structlog.get_logger(__name__)


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
    ) -> None:
        self._topics = topics
        self._coordinator = coordinator
        self._store = store
        self._reporter = reporter
        self._max_payload = max_payload_bytes
        self._simulator = simulator

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
            self._fault(parsed, message)
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
        if isinstance(topic, GroupCommandTopic):
            request_id = self._salvage(message.payload) or f"auto-{uuid.uuid4().hex}"
            to = _GroupReply(topic, request_id, replies=[reply] if reply else [])
            self._say_group(to, "", "rejected", ShuttingDown())
            return
        self._reject(topic, message.payload, reply, ShuttingDown())

    async def _command(self, topic: CommandTopic, message: Inbound) -> Callable[[], None] | None:
        payload = message.payload
        reply = None
        structlog.contextvars.bind_contextvars(camera=clip(topic.camera), stream=clip(topic.stream))
        try:
            reply = _reply_to(message, self._topics)
            request = await self._validate(topic, message.retain, payload, reply)
            if request is None:
                return _nothing  # a replay: the original request's record answers it
            await self._coordinator.submit(request)
        except AgentError as exc:
            self._reject(topic, payload, reply, exc)
        except Exception as exc:
            log.exception("command failed unexpectedly")
            self._reject(topic, payload, reply, Internal(f"{type(exc).__name__}: {exc}"))
        else:
            return partial(self._answer, topic, request.id, reply, ShuttingDown())
        finally:
            structlog.contextvars.unbind_contextvars("camera", "stream", "request_id")
        return None

    async def _validate(
        self, topic: CommandTopic, retain: bool, payload: bytes, reply: ReplyTo | None
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
        if self._coordinator.replay(request_id, topic.camera, reply):
            return None
        now = time.time()
        if command.expires_at is not None and now > command.expires_at:
            raise Expired(expires_at=command.expires_at, now=now)
        self._coordinator.check_target(topic.camera, topic.stream)
        deployment = None
        if isinstance(command, Deploy):
            deployment = await self._deployment(command, request_id)
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
        self, topic: CommandTopic, payload: bytes, reply: ReplyTo | None, exc: AgentError
    ) -> None:
        self._answer(topic, self._salvage(payload) or f"auto-{uuid.uuid4().hex}", reply, exc)

    def _answer(
        self, topic: CommandTopic, request_id: str, reply: ReplyTo | None, exc: AgentError
    ) -> None:
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

    def _salvage(self, payload: bytes) -> str | None:
        """The request_id to echo in a rejection; never raises, whatever the payload holds."""
        try:
            return salvage_request_id(payload)
        except Exception:  # the rejection path must not fail where the main path did
            log.exception("request_id not recoverable from a rejected payload")
            return None

    # --- group commands: `{prefix}/groups/{group}/nn/{action}` ------------------------------

    async def _group(self, topic: GroupCommandTopic, message: Inbound) -> Callable[[], None] | None:
        """A group command: one request per camera its target selects here, all under its
        request_id; `skipped` when it selects none. A problem of the command as a whole is
        one `rejected` with no camera."""
        reply = None
        to = _GroupReply(topic, self._salvage(message.payload) or f"auto-{uuid.uuid4().hex}")
        structlog.contextvars.bind_contextvars(group=topic.group, request_id=to.request_id)
        try:
            reply = _reply_to(message, self._topics)
            to.replies = [reply] if reply else []
            submitted, replayed = await self._group_requests(to, message)
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
            return partial(self._refuse_members, to, submitted)
        return _nothing if replayed else None  # a replay: a camera's record answers it

    async def _group_requests(
        self, to: _GroupReply, message: Inbound
    ) -> tuple[list[Request], bool]:
        """The requests submitted, one per camera, and whether any camera replayed instead."""
        payload = message.payload
        if message.retain:
            raise RetainedCommand
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(size=len(payload), limit=self._max_payload)
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
        reply = to.replies[0] if to.replies else None
        fresh = [c for c in cameras if not self._coordinator.replay(to.request_id, c, reply)]
        if not fresh:
            return [], True
        now = time.time()
        if command.expires_at is not None and now > command.expires_at:
            raise Expired(expires_at=command.expires_at, now=now)
        deployment = None
        if isinstance(command, Deploy):  # the model is stored once for every camera
            deployment = await self._deployment(command, to.request_id)
        submitted = []
        for camera in fresh:
            request = await self._member(to, camera, deployment)
            if request is not None:
                submitted.append(request)
        return submitted, len(fresh) < len(cameras)

    async def _member(
        self, to: _GroupReply, camera: str, deployment: Deployment | None
    ) -> Request | None:
        """Submit the group command's request for one camera; None when it was rejected."""
        try:
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
            self._say_group(to, request.camera, "rejected", ShuttingDown())

    def _say_group(
        self, to: _GroupReply, camera: str, state: RequestState, exc: AgentError | None = None
    ) -> None:
        if exc is not None:
            log.warning("group command rejected", camera=camera, code=exc.code, error=exc.message)
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

    def _fault(self, topic: SimulatorTopic, message: Inbound) -> None:
        if self._simulator is None:
            return
        if message.retain:
            log.warning("retained simulator command ignored", camera=clip(topic.camera))
            return
        camera = self._simulator.cameras.get(topic.camera)
        if camera is None:
            log.warning("simulator command for unknown camera", camera=clip(topic.camera))
            return
        log.info("simulator fault", camera=topic.camera, fault=topic.fault)
        match topic.fault:
            case "unplug":
                camera.unplug()
            case "replug":
                camera.replug()
            case "fail_next_boot":
                camera.fail_next_boot()
