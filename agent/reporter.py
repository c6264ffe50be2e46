"""Everything the agent tells the world: encodes state, events and detections for the link."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np

from agent.messages import (
    AgentErrorEvent,
    CameraStatus,
    Detection,
    DetectionsMessage,
    Event,
    Info,
    Layer,
    NNStatus,
    Spatial,
    encode_json,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from agent.cameras.base import Output
    from agent.errors import AgentError
    from agent.messages import ReplyTo
    from agent.status import Route
    from agent.topics import Topics

__all__ = ["Publisher", "Reporter"]

_SPATIAL_COLUMNS: Final = 9


class Publisher(Protocol):
    """What the reporter publishes through: the MQTT link (agent/mqtt.py) implements it."""

    def retain(self, topic: str, payload: bytes) -> None:
        """Set the retained state of `topic`; the latest value wins."""

    def send(self, topic: str, payload: bytes) -> None:
        """Queue an event that answers a command: never dropped."""

    def send_reply(self, reply: ReplyTo, payload: bytes) -> None:
        """Queue a copy of such an event to a Response Topic: never dropped."""

    def report(self, topic: str, payload: bytes) -> None:
        """Queue a report of the agent's own: dropped (and counted) when the queue is full."""

    @property
    def has_room_for_detections(self) -> bool:
        """False when a detection offered now would be dropped."""

    def count_dropped_detection(self) -> None:
        """Count a detection dropped before it was built."""

    def offer(self, topic: str, payload: bytes) -> None:
        """Publish a detection now if it can go; else drop and count it."""


class Reporter:
    def __init__(self, link: Publisher, topics: Topics) -> None:
        self._link = link
        self._topics = topics
        self._routes: dict[str, Mapping[str, Route]] = {}  # camera -> stream -> route

    # --- retained state ------------------------------------------------------------------

    def availability(self, online: bool) -> None:
        self._link.retain(self._topics.availability, b"online" if online else b"offline")

    def info(self, info: Info) -> None:
        self._link.retain(self._topics.info, encode_json(info))

    def camera_availability(self, camera: str, online: bool) -> None:
        payload = b"online" if online else b"offline"
        self._link.retain(self._topics.camera_availability(camera), payload)

    def camera_status(self, camera: str, status: CameraStatus) -> None:
        self._link.retain(self._topics.camera_status(camera), encode_json(status))

    def nn_status(self, camera: str, stream: str, status: NNStatus) -> None:
        self._link.retain(self._topics.nn_status(camera, stream), encode_json(status))

    # --- events --------------------------------------------------------------------------

    def event(self, event: Event, replies: Iterable[ReplyTo] = ()) -> None:
        payload = encode_json(event)
        self._link.send(self._topics.events, payload)
        for reply in replies:
            self._link.send_reply(reply, payload)

    def agent_error(self, error: AgentError, *, context: str | None = None) -> None:
        """Publish a problem of the agent itself (not of one request) on `{base}/errors`."""
        message = f"{context}: {error.message}" if context else error.message
        event = AgentErrorEvent(code=error.code, message=message, ts=time.time())
        self._link.report(self._topics.errors, encode_json(event))

    # --- detections ----------------------------------------------------------------------

    def routes(self, camera: str, routes: Mapping[str, Route]) -> None:
        """Publish the output of `camera`'s streams as `routes` say; of the others, none."""
        self._routes[camera] = routes

    def on_output(self, output: Output) -> None:
        routes = self._routes.get(output.camera)
        route = routes.get(output.stream) if routes is not None else None
        if route is None:  # a stream that is restarting or was just removed
            return
        if not self._link.has_room_for_detections:  # drop before paying for the encoding
            self._link.count_dropped_detection()
            return
        self._link.offer(route.topic, encode_json(_message(output, route)))


def _message(output: Output, route: Route) -> DetectionsMessage:
    detections = layers = None
    if output.detections is not None:
        # float32 -> float64 rounded: short, stable JSON numbers
        rows = output.detections.astype(np.float64).round(5).tolist()
        detections = _detections(rows, route.labels)
    if output.layers is not None:
        layers = tuple(
            Layer(name=raw.name, dims=raw.dims, dtype=raw.dtype, data=raw.data.reshape(-1))
            for raw in output.layers
        )
    return DetectionsMessage(
        camera=output.camera,
        stream=output.stream,
        seq=output.seq,
        ts=time.time(),
        device_ts=output.device_ts,
        model_sha256=route.model_sha256,
        type=route.type,
        detections=detections,
        layers=layers,
    )


def _detections(rows: list[list[float]], labels: tuple[str, ...] | None) -> tuple[Detection, ...]:
    result = []
    for row in rows:
        label = int(row[0])
        name = labels[label] if labels is not None and 0 <= label < len(labels) else None
        spatial = Spatial(x=row[6], y=row[7], z=row[8]) if len(row) >= _SPATIAL_COLUMNS else None
        result.append(
            Detection(
                label=label,
                confidence=row[1],
                coords=(row[2], row[3], row[4], row[5]),
                label_name=name,
                spatial_coords=spatial,
            )
        )
    return tuple(result)
