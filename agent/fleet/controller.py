"""Drives one rollout over MQTT: discovery, waves of per-camera commands, abort and rollback.

Every camera gets its command on its own agent's topic (not a group topic), so the
controller decides how many change at once. Each camera's request carries the rollout id
as request_id (the agent tells a camera's requests apart by camera), the rollback
`{id}.rollback`; sending one again after a crash is answered from the agent's record
instead of running twice. The record is kept retained on `{prefix}/rollouts/{id}` after
every change. A camera whose agent does not store the model waits (`uploading`) for its
agent's upload (agent/fleet/delivery.py); its command then names the model by sha256.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiomqtt
import anyio
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import ErrorInfo
from agent.fleet.plan import (
    CHANGED,
    Previous,
    Rollout,
    abort_reason,
    decode_rollout,
    encode_rollout,
    next_wave,
    previous_of,
)
from agent.messages import Event, Info, ModelEntry, NNStatus
from agent.mqtt import payload_bytes
from agent.signing import KEY_ID_PROPERTY, SIGNATURE_PROPERTY, envelope, sign

if TYPE_CHECKING:
    import logging

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.connect import BrokerOptions
    from agent.fleet.delivery import Uploads
    from agent.fleet.plan import Target, TargetState
    from agent.topics import FleetTopics

__all__ = ["Controller", "FleetView", "Progress", "Signer", "connect", "sync"]

_SYNC_SECONDS: Final = 10.0
_PUBLISH_SECONDS: Final = 10.0

_event_decoder: Final = msgspec.json.Decoder(Event)
_info_decoder: Final = msgspec.json.Decoder(Info)
_status_decoder: Final = msgspec.json.Decoder(NNStatus)
_models_decoder: Final = msgspec.json.Decoder(tuple[ModelEntry, ...])


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs every command the controller sends (agents with `[security]`)."""

    key: Ed25519PrivateKey
    key_id: str
    expires_in: float = 60.0  # each command's expires_at, from when it is sent
    mqtt5: bool = True  # user properties; else the envelope

    def signed(self, topic: str, payload: bytes) -> tuple[bytes, Properties | None]:
        signature = sign(self.key, topic, payload)
        if not self.mqtt5:
            return envelope(payload, self.key_id, signature), None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [
            (KEY_ID_PROPERTY, self.key_id),
            (SIGNATURE_PROPERTY, base64.b64encode(signature).decode()),
        ]
        return payload, properties


class Progress(Protocol):
    """Shows a rollout as it goes."""

    def update(self, rollout: Rollout) -> None: ...


@dataclass(eq=False)
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    last: Event | None = None


def _decode(decoder: msgspec.json.Decoder[Any], payload: bytes) -> Any:
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


@dataclass(eq=False)
class FleetView:
    """Everything the controller has read: retained info, availability, NN status, rollout
    records, and the events it waits for."""

    topics: FleetTopics
    infos: dict[str, Info] = field(default_factory=dict)
    online: set[str] = field(default_factory=set)
    statuses: dict[tuple[str, str], NNStatus] = field(default_factory=dict)
    models: dict[str, frozenset[str]] = field(default_factory=dict)  # agent -> stored sha256s
    records: dict[str, Rollout] = field(default_factory=dict)
    controllers: dict[str, str] = field(default_factory=dict)  # rollout id -> online/offline
    abort_requested: set[str] = field(default_factory=set)
    _waiters: dict[tuple[str, str, str], _Waiter] = field(default_factory=dict)
    _markers: dict[str, anyio.Event] = field(default_factory=dict)
    _record_changed: anyio.Event = field(default_factory=anyio.Event)

    def record_changed(self) -> anyio.Event:
        """Set when the next rollout record arrives."""
        return self._record_changed

    def take(self, topic: str, payload: bytes) -> None:
        """Note one received message (anything that does not decode is skipped)."""
        prefix = self.topics.prefix
        rollouts = f"{prefix}/rollouts/"
        if topic.startswith(rollouts):
            self._rollout(topic[len(rollouts) :], payload)
            return
        agent_id = self.topics.agent_of(topic)
        if not agent_id:
            return
        base = self.topics.agent(agent_id)
        if topic == base.info:
            info = _decode(_info_decoder, payload)
            if info is not None:
                self.infos[agent_id] = info
        elif topic == base.models:
            entries = _decode(_models_decoder, payload)
            if entries is not None:
                self.models[agent_id] = frozenset(entry.sha256 for entry in entries)
        elif topic == base.availability:
            if payload == b"online":
                self.online.add(agent_id)
            else:
                self.online.discard(agent_id)
        elif topic == base.events:
            event = _decode(_event_decoder, payload)
            if event is not None:
                self._event(agent_id, event)
        elif topic.endswith("/nn/status"):
            parts = topic.split("/")  # prefix/agent/cameras/mxid/streams/stream/nn/status
            status = _decode(_status_decoder, payload)
            if len(parts) == 8 and status is not None:
                self.statuses[agent_id, parts[3]] = status

    def _rollout(self, rest: str, payload: bytes) -> None:
        rollout_id, _, what = rest.partition("/")
        if not what:
            record = decode_rollout(payload)
            if record is not None and record.id == rollout_id:
                self.records[rollout_id] = record
                self._record_changed.set()
                self._record_changed = anyio.Event()
        elif what == "controller":
            self.controllers[rollout_id] = payload.decode(errors="replace")
        elif what == "abort":
            self.abort_requested.add(rollout_id)
        elif what == "sync":
            marker = self._markers.pop(payload.decode(errors="replace"), None)
            if marker is not None:
                marker.set()

    def _event(self, agent_id: str, event: Event) -> None:
        waiter = self._waiters.get((agent_id, event.camera, event.request_id))
        if waiter is None or waiter.done.is_set():
            return
        waiter.last = event
        if event.terminal:
            waiter.done.set()

    def stores(self, agent_id: str, sha256: str) -> bool:
        """Whether the agent's retained model list names the model."""
        return sha256 in self.models.get(agent_id, ())

    def wait_for(self, agent_id: str, camera: str, request_id: str) -> _Waiter:
        """Start waiting for a request's final answer (before the command is sent)."""
        waiter = _Waiter()
        self._waiters[agent_id, camera, request_id] = waiter
        return waiter

    def marker(self, name: str) -> anyio.Event:
        event = anyio.Event()
        self._markers[name] = event
        return event


def connect(
    broker: BrokerOptions,
    *,
    protocol: str,
    client_id: str,
    will: aiomqtt.Will | None = None,
    logger: logging.Logger | None = None,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        **broker.client_kwargs(),
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311,
        will=will,
        timeout=_SYNC_SECONDS,
        logger=logger,
    )


async def read_into(client: aiomqtt.Client, view: FleetView) -> None:
    """Feed every received message to `view` until the connection ends."""
    async for message in client.messages:
        view.take(message.topic.value, payload_bytes(message))


async def sync(client: aiomqtt.Client, view: FleetView, rollout_id: str) -> None:
    """Return once every retained message of the subscriptions made so far has arrived."""
    name = uuid.uuid4().hex
    arrived = view.marker(name)
    await client.publish(view.topics.rollout_sync(rollout_id), name.encode(), qos=1)
    with anyio.fail_after(_SYNC_SECONDS):
        await arrived.wait()


def _state_of(event: Event | None) -> tuple[TargetState, ErrorInfo | None]:
    if event is None:
        return "unknown", None
    match event.state:
        case "succeeded":
            return "succeeded", None
        case "rejected":
            return "rejected", event.error
        case "superseded":
            return "failed", ErrorInfo("superseded", f"superseded by {event.superseded_by}")
        case _:
            return "failed", event.error


def _incomplete(wave: list[Target], timeout: float) -> str:
    """Why a wave left outcomes unknown."""
    unknown = [t for t in wave if t.state == "unknown"]
    undelivered = sum(t.error is not None and t.error.code == "upload_unanswered" for t in unknown)
    why = []
    if undelivered:
        why.append(f"the model did not reach the agent of {undelivered} camera(s)")
    if unanswered := len(unknown) - undelivered:
        why.append(f"no final answer from {unanswered} camera(s) within {timeout:g} s")
    return "; ".join(why) + "; resume to learn their outcome"


class Controller:
    """Runs one rollout to its end (or until its outcomes are unknown), keeping its record."""

    def __init__(
        self,
        client: aiomqtt.Client,
        view: FleetView,
        rollout: Rollout,
        *,
        progress: Progress,
        uploads: Uploads | None = None,
        signer: Signer | None = None,
    ) -> None:
        self._signer = signer
        self._client = client
        self._view = view
        self._rollout = rollout
        self._uploads = uploads  # the model, for agents that lack it
        self._progress = progress

    @property
    def rollout(self) -> Rollout:
        return self._rollout

    async def run(self) -> Rollout:
        rollout = self._rollout
        topics = self._view.topics
        await self._client.publish(
            topics.rollout_controller(rollout.id), b"online", qos=1, retain=True
        )
        await self.save()
        while rollout.state == "running":
            if rollout.id in self._view.abort_requested:
                await self._abort("abort requested")
                break
            wave = next_wave(rollout)
            if not wave:
                executed = [t.state for t in rollout.targets]
                rollout.state = "succeeded" if set(executed) == {"succeeded"} else "completed"
                break
            rollout.waves += 1
            await self._wave(wave, rollout.waves)
            reason = abort_reason(rollout)
            if reason is None and rollout.id in self._view.abort_requested:
                reason = "abort requested"
            if reason is not None:
                await self._abort(reason)
            elif any(t.state == "unknown" for t in wave):
                rollout.state = "incomplete"
                rollout.reason = _incomplete(wave, rollout.options.timeout)
        if rollout.state == "aborting":  # resumed while rolling back
            await self._rollback()
        await self.save()
        await self._client.publish(
            topics.rollout_controller(rollout.id), b"offline", qos=1, retain=True
        )
        return rollout

    async def save(self) -> None:
        rollout = self._rollout
        rollout.updated_at = time.time()
        self._progress.update(rollout)
        await self._client.publish(
            self._view.topics.rollout(rollout.id),
            encode_rollout(rollout),
            qos=1,
            retain=True,
            timeout=_PUBLISH_SECONDS,
        )

    async def _abort(self, reason: str) -> None:
        self._rollout.state = "aborting"
        self._rollout.reason = reason
        await self.save()
        await self._rollback()

    # --- a wave ---------------------------------------------------------------------------

    async def _wave(self, wave: list[Target], number: int) -> None:
        for target in wave:
            if target.previous is None:  # kept from the first run when resumed
                target.previous = previous_of(
                    self._view.statuses.get((target.agent, target.camera))
                )
            target.state = "uploading" if self._must_upload(target.agent) else "sent"
            target.wave = number
        await self.save()  # sent before it is: a resume sends it again, under the same id
        async with anyio.create_task_group() as tg:
            for target in wave:
                tg.start_soon(self._change, target)

    def _must_upload(self, agent_id: str) -> bool:
        uploads = self._uploads
        if uploads is None or agent_id in uploads.held:
            return False
        return not self._view.stores(agent_id, uploads.model.sha256)

    async def _change(self, target: Target) -> None:
        rollout = self._rollout
        spec = rollout.spec
        body: dict[str, Any] = {"request_id": rollout.request_id}
        if spec.action == "deploy":
            body |= {"nn_config": spec.nn_config, "model_sha256": spec.model_sha256}
            body |= {"model_name": spec.model_name, "labels": spec.labels}
            body |= {"model_url": spec.model_url, "model_size": spec.model_size}
            if target.state == "uploading":
                if not await self._deliver(target):
                    return
                target.state = "sent"
                await self.save()
        event = await self._request(target, spec.action, body)
        if (
            event is not None
            and event.error is not None
            and event.error.code == "model_not_found"
            and self._uploads is not None
        ):  # its list said it held the model, or it pruned it meanwhile: upload, then again
            self._uploads.forget(target.agent)
            if not await self._deliver(target):
                return
            event = await self._request(target, spec.action, body)
        target.state, target.error = _state_of(event)
        await self.save()

    async def _deliver(self, target: Target) -> bool:
        """Upload the model to the target's agent unless it holds it; False (and the
        target's outcome saved) when that failed."""
        uploads = self._uploads
        if uploads is None:
            return True
        agent_id = target.agent
        delivered = await uploads.ensure(agent_id, self._view.topics.agent(agent_id))
        if delivered.ok:
            if agent_id in uploads.sent and agent_id not in self._rollout.uploaded:
                self._rollout.uploaded.append(agent_id)
            return True
        target.state, target.error = delivered.state, delivered.error
        await self.save()
        return False

    async def _request(self, target: Target, action: str, body: dict[str, Any]) -> Event | None:
        """Send one command and wait for its final answer; None when none came in time."""
        body = {k: v for k, v in body.items() if v is not None}
        topic = self._view.topics.agent(target.agent).command(
            target.camera,
            self._rollout.spec.stream,
            action,  # type: ignore[arg-type]
        )
        if self._signer is not None:  # signed commands name their end
            body = body | {"expires_at": time.time() + self._signer.expires_in}
        waiter = self._view.wait_for(target.agent, target.camera, body["request_id"])
        payload = msgspec.json.encode(body)
        properties = None
        if self._signer is not None:
            payload, properties = self._signer.signed(topic, payload)
        await self._client.publish(
            topic, payload, qos=1, properties=properties, timeout=_PUBLISH_SECONDS
        )
        with anyio.move_on_after(self._rollout.options.timeout):
            await waiter.done.wait()
        return waiter.last if waiter.done.is_set() else None

    # --- rollback -------------------------------------------------------------------------

    async def _rollback(self) -> None:
        rollout = self._rollout
        changed = [
            t
            for t in rollout.targets
            if (t.state in CHANGED or t.state == "rollback_unknown") and t.previous is not None
        ]
        async with anyio.create_task_group() as tg:
            for target in changed:
                tg.start_soon(self._put_back, target)
        rollout.state = "aborted"

    async def _put_back(self, target: Target) -> None:
        previous = target.previous or Previous()
        body: dict[str, Any] = {"request_id": self._rollout.rollback_request_id}
        if previous.model_sha256 is None:
            action = "delete"
        else:
            action = "deploy"
            body |= {"nn_config": previous.nn_config, "model_sha256": previous.model_sha256}
            body |= {"labels": previous.labels, "model_name": previous.model_name}
        event = await self._request(target, action, body)
        state, error = _state_of(event)
        if state == "succeeded":
            target.state = "rolled_back"
        elif state == "unknown":
            target.state = "rollback_unknown"
        else:
            target.state, target.rollback_error = "rollback_failed", error
        await self.save()
