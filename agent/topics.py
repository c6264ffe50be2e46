"""Pure building and parsing of the agent's MQTT topic names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.errors import echo

if TYPE_CHECKING:
    from agent.vocab import Action

__all__ = [
    "MXID_RE",
    "OFFSET_RE",
    "SHA256_RE",
    "STREAM_RE",
    "CommandTopic",
    "DiscoveryTopics",
    "FleetTopics",
    "GroupCommandTopic",
    "SimulatorTopic",
    "StatsRequest",
    "Topics",
    "UploadTopic",
    "is_depth_stream",
]

MXID_RE = re.compile(r"[A-Z0-9]{1,64}")
STREAM_RE = re.compile(r"CAM_[A-H]|DEPTH_[A-H]_[A-H]")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# a byte offset in decimal: no sign, no leading zero, below 10^15 (far above any model)
OFFSET_RE = re.compile(r"0|[1-9][0-9]{0,14}")

Fault = Literal["unplug", "replug", "fail_next_boot", "objects"]


def is_depth_stream(stream: str) -> bool:
    return stream.startswith("DEPTH_")


@dataclass(frozen=True, slots=True)
class CommandTopic:
    camera: str
    stream: str
    action: Action


@dataclass(frozen=True, slots=True)
class GroupCommandTopic:
    """A command to every agent of a group: `{prefix}/groups/{group}/nn/{action}`."""

    group: str
    action: Action


@dataclass(frozen=True, slots=True)
class SimulatorTopic:
    camera: str
    fault: Fault


@dataclass(frozen=True, slots=True)
class UploadTopic:
    """`{base}/models/{sha256}/upload` (offset None) or `.../chunks/{offset}`.

    `sha256` is the segment as given; `problem` says why the topic is unusable (a sha256
    that is not 64 lowercase hex digits, an offset that is not a decimal number).
    """

    sha256: str
    kind: Literal["upload", "chunk"]
    offset: int | None = None  # a chunk's, when it parses
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """A request to publish the stats now."""


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one agent, rooted at `{prefix}/{agent_id}`."""

    base: str
    # the groups this agent belongs to: it acts on their group commands only
    groups: tuple[str, ...] = ()

    @classmethod
    def for_agent(cls, prefix: str, agent_id: str, groups: tuple[str, ...] = ()) -> Topics:
        return cls(f"{prefix}/{agent_id}", groups)

    @property
    def prefix(self) -> str:
        """The first level(s), shared by every agent on the broker (agent ids hold no `/`)."""
        return self.base.rpartition("/")[0]

    def in_prefix(self, topic: str) -> bool:
        """Whether `topic` is the prefix or under it: any agent's topic, commands included."""
        return topic == self.prefix or topic.startswith(f"{self.prefix}/")

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def info(self) -> str:
        return f"{self.base}/info"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def errors(self) -> str:
        return f"{self.base}/errors"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def stats_request(self) -> str:
        return f"{self.base}/stats/request"

    @property
    def command_filters(self) -> tuple[str, str]:
        return (
            f"{self.base}/cameras/+/streams/+/nn/deploy",
            f"{self.base}/cameras/+/streams/+/nn/delete",
        )

    @property
    def group_command_filters(self) -> tuple[str, ...]:
        return tuple(
            self.group_command(group, action)
            for group in self.groups
            for action in ("deploy", "delete")
        )

    def group_command(self, group: str, action: Action) -> str:
        return f"{self.prefix}/groups/{group}/nn/{action}"

    @property
    def upload_filters(self) -> tuple[str, str]:
        return (f"{self.base}/models/+/upload", f"{self.base}/models/+/chunks/+")

    @property
    def models(self) -> str:
        return f"{self.base}/models"

    def upload(self, sha256: str) -> str:
        return f"{self.base}/models/{sha256}/upload"

    def chunk(self, sha256: str, offset: int) -> str:
        return f"{self.base}/models/{sha256}/chunks/{offset}"

    def upload_status(self, sha256: str) -> str:
        return f"{self.base}/models/{sha256}/status"

    def parse_upload(self, topic: str) -> UploadTopic | None:
        """Parse a model upload topic; None when `topic` is not one (it may be a command)."""
        prefix = self.base + "/models/"
        if not topic.startswith(prefix):
            return None
        match topic[len(prefix) :].split("/"):
            case [sha256, "upload"]:
                kind: Literal["upload", "chunk"] = "upload"
                offset = None
                problem = None
            case [sha256, "chunks", raw]:
                kind = "chunk"
                offset = int(raw) if raw.isascii() and OFFSET_RE.fullmatch(raw) else None
                problem = None if offset is not None else f"offset {echo(raw)} is not decimal"
            case _:
                return None
        if not SHA256_RE.fullmatch(sha256):
            problem = f"{echo(sha256)} is not a sha256 (64 lowercase hex digits)"
        if problem is not None:
            return UploadTopic(sha256, kind, None, problem)
        return UploadTopic(sha256, kind, offset)

    @property
    def simulator_filter(self) -> str:
        return f"{self.base}/simulator/cameras/+/+"

    def camera_availability(self, camera: str) -> str:
        return f"{self.base}/cameras/{camera}/availability"

    def camera_status(self, camera: str) -> str:
        return f"{self.base}/cameras/{camera}/status"

    def camera_stats(self, camera: str) -> str:
        return f"{self.base}/cameras/{camera}/stats"

    def counts(self, camera: str, stream: str) -> str:
        return f"{self.base}/cameras/{camera}/streams/{stream}/nn/counts"

    def nn_status(self, camera: str, stream: str) -> str:
        return f"{self.base}/cameras/{camera}/streams/{stream}/nn/status"

    def detections(self, camera: str, stream: str) -> str:
        return f"{self.base}/cameras/{camera}/streams/{stream}/nn/detections"

    def command(self, camera: str, stream: str, action: Action) -> str:
        return f"{self.base}/cameras/{camera}/streams/{stream}/nn/{action}"

    def simulator(self, camera: str, fault: Fault) -> str:
        return f"{self.base}/simulator/cameras/{camera}/{fault}"

    def parse(
        self, topic: str
    ) -> CommandTopic | GroupCommandTopic | SimulatorTopic | StatsRequest | None:
        """Parse a topic under this base, or a command to one of its groups; None when it is
        not one the agent acts on.

        The camera and stream segments are returned as given, even when they are not
        valid ids: the caller answers those with a precise error instead of ignoring them.
        """
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return self._parse_group(topic)
        parts = topic[len(prefix) :].split("/")
        match parts:
            case ["cameras", camera, "streams", stream, "nn", ("deploy" | "delete") as action]:
                return CommandTopic(camera, stream, action)
            case [
                "simulator",
                "cameras",
                camera,
                ("unplug" | "replug" | "fail_next_boot" | "objects") as f,
            ]:
                return SimulatorTopic(camera, f)
            case ["stats", "request"]:
                return StatsRequest()
            case _:
                return None

    def _parse_group(self, topic: str) -> GroupCommandTopic | None:
        prefix = f"{self.prefix}/groups/"
        if not topic.startswith(prefix):
            return None
        match topic[len(prefix) :].split("/"):
            case [group, "nn", ("deploy" | "delete") as action] if group in self.groups:
                return GroupCommandTopic(group, action)
            case _:
                return None


@dataclass(frozen=True, slots=True)
class FleetTopics:
    """What a fleet controller reads and writes across every agent under `prefix`."""

    prefix: str

    @property
    def info_filter(self) -> str:
        return f"{self.prefix}/+/info"

    @property
    def availability_filter(self) -> str:
        return f"{self.prefix}/+/availability"

    @property
    def events_filter(self) -> str:
        return f"{self.prefix}/+/events"

    @property
    def models_filter(self) -> str:
        return f"{self.prefix}/+/models"

    def nn_status_filter(self, stream: str) -> str:
        return f"{self.prefix}/+/cameras/+/streams/{stream}/nn/status"

    def agent(self, agent_id: str) -> Topics:
        return Topics.for_agent(self.prefix, agent_id)

    def agent_of(self, topic: str) -> str:
        """The agent id of a topic under `{prefix}/{agent}/`; "" for any other topic."""
        head, _, rest = topic.partition("/")
        if head != self.prefix:
            return ""
        agent_id, _, _ = rest.partition("/")
        return agent_id

    def rollout(self, rollout_id: str) -> str:
        """The rollout's record, retained."""
        return f"{self.prefix}/rollouts/{rollout_id}"

    def rollout_controller(self, rollout_id: str) -> str:
        """`online` while a controller runs the rollout (retained; its will says `offline`)."""
        return f"{self.prefix}/rollouts/{rollout_id}/controller"

    def rollout_abort(self, rollout_id: str) -> str:
        """Asks the controller running the rollout to abort it (never retained)."""
        return f"{self.prefix}/rollouts/{rollout_id}/abort"

    def rollout_sync(self, rollout_id: str) -> str:
        """The controller's own marker: once it comes back, the retained state before it came."""
        return f"{self.prefix}/rollouts/{rollout_id}/sync"


@dataclass(frozen=True, slots=True)
class DiscoveryTopics:
    """Home Assistant's MQTT discovery topics under its `discovery_prefix`."""

    prefix: str

    @property
    def birth(self) -> str:
        """Where Home Assistant says `online` when it (re)starts."""
        return f"{self.prefix}/status"

    @property
    def device_filter(self) -> str:
        """Every device-based discovery config, of any publisher."""
        return f"{self.prefix}/device/+/config"

    def device(self, node: str) -> str:
        return f"{self.prefix}/device/{node}/config"

    def node_of(self, topic: str) -> str | None:
        """The node id of a device discovery config topic; None for any other topic."""
        start, end = f"{self.prefix}/device/", "/config"
        if not (topic.startswith(start) and topic.endswith(end)):
            return None
        node = topic[len(start) : -len(end)]
        return node if node and "/" not in node else None
