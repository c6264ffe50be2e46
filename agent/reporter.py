"""Everything the agent tells the world: encodes state, events and detections for the link."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np

from agent.messages import (
    AgentErrorEvent,
    AgentHealth,
    CameraHealth,
    CameraStatus,
    CommandCounts,
    CountsMessage,
    Detection,
    DetectionsMessage,
    Event,
    Info,
    Layer,
    ModelEntry,
    NNStatus,
    Spatial,
    UploadStatus,
    encode_json,
)
from agent.shaping import Shaper, confident

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping

    import numpy.typing as npt

    from agent.cameras.base import Output
    from agent.errors import AgentError
    from agent.messages import ReplyTo
    from agent.shaping import Counts
    from agent.status import Route
    from agent.topics import Topics

__all__ = ["Publisher", "Reporter", "StatusObserver"]

_SPATIAL_COLUMNS: Final = 9
# the terminal states counted on `{base}/stats`
_OUTCOMES: Final = frozenset(CommandCounts.__struct_fields__)


class Publisher(Protocol):
    """What the reporter publishes through: the MQTT link (agent/mqtt.py) implements it."""

    def retain(self, topic: str, payload: bytes) -> None:
        """Set the retained state of `topic`; the latest value wins; empty clears it."""

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


class StatusObserver(Protocol):
    """Told of the retained state as it is published (Home Assistant discovery follows it)."""

    def info(self, info: Info) -> None:
        """The agent's info, with its cameras, was published."""

    def nn_status(self, camera: str, stream: str, status: NNStatus) -> None:
        """A stream's NN status was published."""


class _Shaping:
    """A running NN's shaping state, kept while its route is unchanged (even across a
    restart of its camera, during which it has no route)."""

    __slots__ = ("route", "shaper")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.shaper = Shaper(route.output, route.labels)


class Reporter:
    def __init__(
        self, link: Publisher, topics: Topics, observer: StatusObserver | None = None
    ) -> None:
        self._link = link
        self._topics = topics
        self._observer = observer
        self._routes: dict[str, Mapping[str, Route]] = {}  # camera -> stream -> route
        self._shaping: dict[tuple[str, str], _Shaping] = {}
        # since the agent started: results per (camera, stream) that reached the agent, and
        # those dropped because the link could not take them
        self.results: Counter[tuple[str, str]] = Counter()
        self.dropped: Counter[tuple[str, str]] = Counter()
        self.commands: Counter[str] = Counter()  # terminal events by state

    # --- retained state ------------------------------------------------------------------

    def availability(self, online: bool) -> None:
        self._link.retain(self._topics.availability, b"online" if online else b"offline")

    def info(self, info: Info) -> None:
        self._link.retain(self._topics.info, encode_json(info))
        if self._observer is not None:
            self._observer.info(info)

    def camera_availability(self, camera: str, online: bool) -> None:
        payload = b"online" if online else b"offline"
        self._link.retain(self._topics.camera_availability(camera), payload)

    def camera_status(self, camera: str, status: CameraStatus) -> None:
        self._link.retain(self._topics.camera_status(camera), encode_json(status))

    def nn_status(self, camera: str, stream: str, status: NNStatus) -> None:
        self._link.retain(self._topics.nn_status(camera, stream), encode_json(status))
        if self._observer is not None:
            self._observer.nn_status(camera, stream, status)

    def upload_status(self, sha256: str, status: UploadStatus | None) -> None:
        """A chunked upload's retained status; None clears it (an empty retained message)."""
        payload = b"" if status is None else encode_json(status)
        self._link.retain(self._topics.upload_status(sha256), payload)

    def models(self, entries: Iterable[ModelEntry]) -> None:
        self._link.retain(self._topics.models, encode_json(tuple(entries)))

    def camera_health(self, camera: str, health: CameraHealth) -> None:
        self._link.retain(self._topics.camera_stats(camera), encode_json(health))

    def agent_health(self, health: AgentHealth) -> None:
        self._link.retain(self._topics.stats, encode_json(health))

    def command_counts(self) -> CommandCounts:
        return CommandCounts(**{state: self.commands[state] for state in _OUTCOMES})

    # --- events --------------------------------------------------------------------------

    def event(self, event: Event, replies: Iterable[ReplyTo] = (), *, replay: bool = False) -> None:
        """Publish a request's event; `replay`: one published before, not counted again."""
        if not replay and event.state in _OUTCOMES:
            self.commands[event.state] += 1
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

    def routes(self, camera: str, routes: Mapping[str, Route], deployed: Collection[str]) -> None:
        """Publish the output of `camera`'s streams as `routes` say; of the others, none.

        `deployed`: the streams that have an NN (running, or to run again after a restart);
        the counts of the others are cleared.
        """
        self._routes[camera] = routes
        for stream, route in routes.items():
            shaping = self._shaping.get((camera, stream))
            if shaping is None or shaping.route != route:
                old = shaping.route.counts_topic if shaping is not None else None
                if old is not None and route.counts_topic is None:  # now a Generic network
                    self._link.retain(old, b"")
                self._shaping[camera, stream] = _Shaping(route)
        for key in [k for k in self._shaping if k[0] == camera and k[1] not in deployed]:
            topic = self._shaping.pop(key).route.counts_topic
            if topic is not None:
                self._link.retain(topic, b"")  # an empty retained message clears it

    def tick(self, now: float) -> None:
        """Let time pass for the shaping: presence that timed out, counts held back."""
        for shaping in self._shaping.values():
            topic = shaping.route.counts_topic
            if topic is not None and (counts := shaping.shaper.tick(now)) is not None:
                self._counts(topic, counts)

    def on_output(self, output: Output) -> None:
        key = (output.camera, output.stream)
        self.results[key] += 1
        routes = self._routes.get(output.camera)
        route = routes.get(output.stream) if routes is not None else None
        shaping = self._shaping.get(key)
        if route is None or shaping is None:  # a stream that is restarting or was just removed
            return
        now = time.monotonic()
        shaper = shaping.shaper
        rows = output.detections
        if rows is not None:
            rows = confident(rows, route.output.min_confidence)
            if route.counts_topic is not None:
                labels = rows[:, 0].astype(np.int64).tolist() if len(rows) else ()
                counts = shaper.observe(labels, now, output.seq)
                if counts is not None:
                    self._counts(route.counts_topic, counts)
        if not shaper.allow_detections(now):  # max_rate: skipped, not queued
            return
        if not self._link.has_room_for_detections:  # drop before paying for the encoding
            self._link.count_dropped_detection()
            self.dropped[key] += 1
            return
        self._link.offer(route.topic, encode_json(_message(output, route, rows)))

    def _counts(self, topic: str, counts: Counts) -> None:
        message = CountsMessage(
            total=counts.total,
            by_label=counts.by_label,
            present=counts.present,
            ts=time.time(),
            seq=counts.seq,
            frame_seq=counts.frame_seq,
        )
        self._link.retain(topic, encode_json(message))


def _message(
    output: Output, route: Route, detections_rows: npt.NDArray[np.float32] | None
) -> DetectionsMessage:
    detections = layers = None
    if detections_rows is not None:
        # float32 -> float64 rounded: short, stable JSON numbers
        rows = detections_rows.astype(np.float64).round(5).tolist()
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
