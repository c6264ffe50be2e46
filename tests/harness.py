"""Drive the real agent through MQTT: run it in-process, watch everything it publishes."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt
import anyio
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.app import App, serve
from agent.config import (
    AgentSection,
    Config,
    MqttSection,
    SecuritySection,
    SimulatedCamera,
    SimulatorSection,
)
from agent.messages import Event
from agent.topics import Topics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.brokers import Broker

__all__ = [
    "CAM1",
    "CAM2",
    "YOLO",
    "Observer",
    "Seen",
    "camera_spec",
    "make_config",
    "observe",
    "running_agent",
    "yolo",
]

# the self-made tests/data/blobs/yolo_tiny.blob is shaped like YOLOv3-tiny (80 classes)
YOLO: dict[str, Any] = {
    "type": "YOLO",
    "nn_config": {
        "num_classes": 80,
        "anchors": [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319],
        "anchor_masks": {"side26": [0, 1, 2], "side13": [3, 4, 5]},
        "iou_threshold": 0.5,
    },
}


def yolo(**options: Any) -> dict[str, Any]:
    """The YOLOv3-tiny config with some options changed."""
    return {"type": "YOLO", "nn_config": {**YOLO["nn_config"], **options}}


CAM1 = "14442C10D13EABCE00"
CAM2 = "18443010C1E1D31200"
WAIT = 20.0  # upper bound for any single wait in a test

_T = TypeVar("_T")
_event_decoder = msgspec.json.Decoder(Event)
_ids = itertools.count()


def camera_spec(mxid: str, **overrides: Any) -> SimulatedCamera:
    values: dict[str, Any] = {
        "mxid": mxid,
        "name": f"cam-{mxid[-4:]}",
        "sensors": {"CAM_A": "color", "CAM_B": "mono", "CAM_C": "mono"},
        "stereo": (("CAM_B", "CAM_C"),),
        "boot_seconds": 0.3,
        "fps": 20.0,
    }
    values.update(overrides)
    return SimulatedCamera(**values)


def make_config(
    broker: Broker,
    state_dir: Path,
    *,
    cameras: tuple[SimulatedCamera, ...] | None = None,
    security: SecuritySection | None = None,
    **agent_options: Any,
) -> Config:
    agent_id = f"t{next(_ids)}-{uuid.uuid4().hex[:8]}"
    return Config(
        agent=AgentSection(id=agent_id, state_dir=str(state_dir), **agent_options),
        mqtt=MqttSection(
            host=broker.host,
            port=broker.port,
            prefix="oaktest",
            protocol=broker.protocol,
            reconnect_min=0.1,
            reconnect_max=0.5,
            publish_timeout=5.0,
        ),
        simulator=SimulatorSection(
            cameras=cameras if cameras is not None else (camera_spec(CAM1), camera_spec(CAM2))
        ),
        security=security if security is not None else SecuritySection(),
    )


@dataclass(frozen=True, slots=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    properties: Properties | None


@dataclass
class Observer:
    """A second MQTT client that records everything under the agent's base topic."""

    client: aiomqtt.Client
    topics: Topics
    messages: list[Seen] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    # the same messages by topic, and events decoded once each: `wait_for` re-asks its
    # question at every message, so a query must not cost a pass over everything seen
    _by_topic: dict[str, list[Seen]] = field(default_factory=dict)
    _events: list[Event] = field(default_factory=list)
    _events_by_id: dict[str, list[Event]] = field(default_factory=dict)

    async def _record(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            seen = Seen(message.topic.value, payload, message.retain, message.properties)
            self.messages.append(seen)
            self._by_topic.setdefault(seen.topic, []).append(seen)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(
        self, find: Callable[[], _T | None], timeout: float = WAIT, what: str = "condition"
    ) -> _T:
        with anyio.fail_after(timeout):
            while True:
                changed = self._changed
                found = find()
                if found:
                    return found
                await changed.wait()
        raise AssertionError(what)  # pragma: no cover

    # --- queries -------------------------------------------------------------------------

    def on(self, topic: str) -> list[Seen]:
        return list(self._by_topic.get(topic, ()))

    def latest(self, topic: str) -> bytes | None:
        found = self.on(topic)
        return found[-1].payload if found else None

    def latest_json(self, topic: str) -> Any:
        payload = self.latest(topic)
        return None if payload is None else msgspec.json.decode(payload)

    def events(self, request_id: str | None = None) -> list[Event]:
        seen = self._by_topic.get(self.topics.events, [])
        for message in seen[len(self._events) :]:
            event = _event_decoder.decode(message.payload)
            self._events.append(event)
            self._events_by_id.setdefault(event.request_id, []).append(event)
        if request_id is None:
            return list(self._events)
        return list(self._events_by_id.get(request_id, ()))

    def states(self, request_id: str) -> list[str]:
        return [e.state for e in self.events(request_id)]

    def terminal(self, request_id: str) -> Event | None:
        return next((e for e in self.events(request_id) if e.terminal), None)

    async def outcome(self, request_id: str, timeout: float = WAIT) -> Event:
        return await self.wait_for(
            lambda: self.terminal(request_id), timeout, f"terminal event for {request_id}"
        )

    def detections(self, camera: str, stream: str) -> list[Any]:
        topic = self.topics.detections(camera, stream)
        return [msgspec.json.decode(m.payload) for m in self.on(topic)]

    # --- commands ------------------------------------------------------------------------

    async def deploy(
        self,
        camera: str,
        stream: str,
        body: dict[str, Any],
        *,
        encoding: str = "json",
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        payload = msgspec.json.encode(body) if encoding == "json" else msgspec.msgpack.encode(body)
        await self.send(self.topics.command(camera, stream, "deploy"), payload, retain, properties)

    async def delete(self, camera: str, stream: str, body: dict[str, Any] | None = None) -> None:
        payload = msgspec.json.encode(body) if body is not None else b""
        await self.send(self.topics.command(camera, stream, "delete"), payload)

    async def send(
        self,
        topic: str,
        payload: bytes,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)


def response_properties(topic: str, correlation: bytes) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = topic
    properties.CorrelationData = correlation
    return properties


@contextlib.asynccontextmanager
async def observe(broker: Broker, topics: Topics) -> AsyncIterator[Observer]:
    protocol = aiomqtt.ProtocolVersion.V5 if broker.mqtt5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=protocol,
        identifier=f"observer-{uuid.uuid4().hex[:8]}",
    ) as client:
        await client.subscribe(f"{topics.base}/#", qos=1)
        observer = Observer(client, topics)
        async with anyio.create_task_group() as tg:
            tg.start_soon(observer._record)
            yield observer
            tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running_agent(config: Config) -> AsyncIterator[App]:
    """Run the real agent in this event loop; stop it (cleanly) on exit."""
    async with anyio.create_task_group() as tg:
        app: App = await tg.start(serve, config)
        yield app
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def agent_and_observer(broker: Broker, config: Config) -> AsyncIterator[tuple[App, Observer]]:
    """The observer subscribes first, so it sees everything the agent publishes."""
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    async with observe(broker, topics) as observer, running_agent(config) as app:
        await observer.wait_for(
            lambda: observer.latest(topics.availability) == b"online", what="agent online"
        )
        yield app, observer
