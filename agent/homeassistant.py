"""Home Assistant MQTT discovery: the agent's cameras as HA devices, their state as entities.

Pure: a view of the agent (its cameras and what their streams run) in, device-based
discovery configs out. Every entity reads the agent's own retained topics through
`value_template` / `json_attributes_template` (no second copy of the state), and its
`unique_id` is built from ids that never change: HA keys its entity registry on it.

One device per camera (`oak_{agent_id}_{mxid}`) and one for the agent
(`oak_{agent_id}_agent`, the cameras' `via_device`). Camera entities are available only
while both the agent and the camera say `online` (`availability_mode: all`). Keys are
HA's abbreviations where it has one; tests/ha_schema.py holds the keys HA accepts, and
every config this module can build is checked against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from agent.topics import MXID_RE

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from agent.topics import DiscoveryTopics, Topics

__all__ = [
    "COUNTED_TYPES",
    "ORIGIN_NAME",
    "CameraView",
    "Component",
    "Discovery",
    "Owned",
    "StreamView",
    "jinja_string",
    "label_slugs",
]

ORIGIN_NAME: Final = "oak-edge-agent"
MANUFACTURER: Final = "Luxonis"
COUNTED_TYPES: Final = frozenset({"YOLO", "MobileNet"})  # networks with counts and presence
MAX_LABELS: Final = 20

_CAMERA_STATES: Final = ("online", "restarting", "offline")
_NN_STATES: Final = ("none", "deploying", "running", "failed")
_TEMPERATURES: Final = ("css", "mss", "upa", "dss")  # chip sensors besides the average
_MEMORIES: Final = ("ddr", "cmx", "leon_css_heap", "leon_mss_heap")
_NODE_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
_SLUG_UNSAFE: Final = re.compile(r"[^a-z0-9]+")
_PRINTABLE: Final = frozenset(map(chr, range(0x20, 0x7F))) - {"\\", "'"}


@dataclass(frozen=True, slots=True)
class StreamView:
    """What one stream runs (deploying, running or failed): its network's type and labels."""

    type: str | None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class CameraView:
    """One camera as HA shows it; `nns` holds only the streams that have an NN."""

    mxid: str
    name: str
    product: str
    firmware: str | None
    nns: Mapping[str, StreamView]


@dataclass(frozen=True, slots=True)
class Component:
    """One entity of a device: its platform and its config (without `p`)."""

    platform: str
    config: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Owned:
    """A retained device config this agent published: which device, which components."""

    node: str
    mxid: str | None  # None: the agent's own device
    components: Mapping[str, str]  # component id -> platform (removal stubs included)
    stubs: frozenset[str]  # component ids that were published as removal stubs


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal that any character survives (HA decodes escapes)."""
    return "'" + "".join(c if c in _PRINTABLE else f"\\U{ord(c):08x}" for c in text) + "'"


def _slug(text: str) -> str:
    return _SLUG_UNSAFE.sub("_", text.lower()).strip("_")


def label_slugs(stream: StreamView, configured: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(label, slug) of the labels that get count and presence entities on `stream`.

    Only YOLO and MobileNet networks with `labels` count; of those labels the configured
    ones (all when none are configured), at most 20, in the deploy's order. A label whose
    slug an earlier one took (`Person` after `person`) gets none.
    """
    if stream.type not in COUNTED_TYPES or not stream.labels:
        return []
    chosen: list[tuple[str, str]] = []
    taken: set[str] = set()
    for index, label in enumerate(stream.labels):
        if configured is not None and label not in configured:
            continue
        slug = _slug(label) or f"label_{index}"
        if slug in taken:
            continue
        taken.add(slug)
        chosen.append((label, slug))
        if len(chosen) == MAX_LABELS:
            break
    return chosen


def _value(*path: str) -> str:
    """A Jinja expression for `value_json[path...]`, `None` wherever it is missing."""
    expression = "(value_json if value_json is defined else {})"
    for key in path[:-1]:
        expression = f"({expression}.get({jinja_string(key)}) or {{}})"
    return f"{expression}.get({jinja_string(path[-1])})"


def _template(expression: str) -> str:
    return "{{ " + expression + " }}"


class Discovery:
    """Builds the discovery configs of one agent's devices."""

    def __init__(
        self,
        *,
        topics: Topics,
        discovery: DiscoveryTopics,
        agent_id: str,
        version: str,
        labels: tuple[str, ...] | None = None,
    ) -> None:
        self._topics = topics
        self._discovery = discovery
        self._agent_id = agent_id
        self._version = version
        self._labels = labels
        self._encode = msgspec.json.Encoder().encode

    # --- ids ----------------------------------------------------------------------------

    @property
    def agent_identifier(self) -> str:
        return f"oak_{self._agent_id}_agent"

    def camera_identifier(self, mxid: str) -> str:
        return f"oak_{self._agent_id}_{mxid}"

    @staticmethod
    def node(identifier: str) -> str:
        """The discovery topic's node id: the identifier with `.` (allowed in agent ids) as `_`."""
        return _NODE_UNSAFE.sub("_", identifier)

    @property
    def agent_topic(self) -> str:
        return self._discovery.device(self.node(self.agent_identifier))

    def camera_topic(self, mxid: str) -> str:
        return self._discovery.device(self.node(self.camera_identifier(mxid)))

    def owner(self, identifier: str) -> tuple[bool, str | None]:
        """(whether `identifier` is one of this agent's devices, the camera's mxid if one)."""
        if identifier == self.agent_identifier:
            return True, None
        start = f"oak_{self._agent_id}_"
        mxid = identifier[len(start) :]
        if identifier.startswith(start) and MXID_RE.fullmatch(mxid):
            return True, mxid
        return False, None

    # --- the agent's device -------------------------------------------------------------

    def agent_components(self) -> dict[str, Component]:
        topics, agent = self._topics, self._agent_id
        available = [{"t": topics.availability}]

        def sensor(key: str, name: str, topic: str, value: str, **extra: Any) -> Component:
            config = {
                "name": name,
                "uniq_id": f"{agent}_{key}",
                "obj_id": f"{agent}_{key}",
                "default_entity_id": f"sensor.{agent}_{key}",
                "stat_t": topic,
                "val_tpl": _template(value),
                "avty": available,
                **extra,
            }
            return Component("sensor", config)

        return {
            "connectivity": Component(
                "binary_sensor",
                {
                    "name": "Connectivity",
                    "uniq_id": f"{agent}_connectivity",
                    "obj_id": f"{agent}_connectivity",
                    "default_entity_id": f"binary_sensor.{agent}_connectivity",
                    "dev_cla": "connectivity",
                    "stat_t": topics.availability,
                    "pl_on": "online",
                    "pl_off": "offline",
                },
            ),
            "version": sensor(
                "version",
                "Version",
                topics.info,
                _value("version"),
                ent_cat="diagnostic",
                ic="mdi:tag",
                json_attr_t=topics.info,
                json_attr_tpl=_template(
                    "{'depthai_version': "
                    + _value("depthai_version")
                    + ", 'backend': "
                    + _value("backend")
                    + "} | tojson"
                ),
            ),
            "cameras": sensor(
                "cameras",
                "Cameras",
                topics.info,
                f"({_value('cameras')} or []) | length",
                stat_cla="measurement",
                ic="mdi:cctv",
            ),
            "detections_dropped": sensor(
                "detections_dropped",
                "Detections dropped",
                topics.stats,
                _value("detections_dropped"),
                stat_cla="total_increasing",
                ent_cat="diagnostic",
                ic="mdi:delete-clock",
            ),
            "cpu": sensor(
                "cpu",
                "CPU",
                topics.stats,
                _value("cpu_percent"),
                unit_of_meas="%",
                stat_cla="measurement",
                ent_cat="diagnostic",
                ic="mdi:cpu-64-bit",
            ),
            "rss": sensor(
                "rss",
                "Memory (RSS)",
                topics.stats,
                _value("rss_bytes"),
                dev_cla="data_size",
                unit_of_meas="B",
                stat_cla="measurement",
                ent_cat="diagnostic",
            ),
        }

    def agent_config(self, gone: Mapping[str, str] | None = None) -> bytes:
        device = {
            "ids": [self.agent_identifier],
            "name": f"OAK agent {self._agent_id}",
            "mf": ORIGIN_NAME,
            "mdl": "OAK edge agent",
            "sw": self._version,
        }
        return self._payload(device, self.agent_components(), gone, shared={})

    # --- a camera's device --------------------------------------------------------------

    def camera_components(self, camera: CameraView) -> dict[str, Component]:
        topics, mxid = self._topics, camera.mxid
        base_id = f"{self._agent_id}_{mxid}"
        status, stats = topics.camera_status(mxid), topics.camera_stats(mxid)
        components: dict[str, Component] = {}

        def add(key: str, platform: str, name: str, **config: Any) -> None:
            unique = f"{base_id}_{key}"
            components[key] = Component(
                platform,
                {
                    "name": name,
                    "uniq_id": unique,
                    "obj_id": unique,
                    "default_entity_id": f"{platform}.{unique}",
                    **config,
                },
            )

        add(
            "state",
            "sensor",
            "State",
            stat_t=status,
            val_tpl=_template(_value("state")),
            dev_cla="enum",
            ops=list(_CAMERA_STATES),
            ic="mdi:cctv",
        )
        add(
            "restarts",
            "sensor",
            "Restarts",
            stat_t=status,
            val_tpl=_template(_value("restarts")),
            stat_cla="total_increasing",
            ent_cat="diagnostic",
            ic="mdi:restart",
        )
        add(
            "last_error",
            "sensor",
            "Last error",
            stat_t=status,
            val_tpl=_template(f"{_value('last_error', 'code')} or 'none'"),
            json_attr_t=status,
            json_attr_tpl=_template(f"({_value('last_error')} or {{}}) | tojson"),
            ent_cat="diagnostic",
            ic="mdi:alert-circle-outline",
        )
        add(
            "temperature",
            "sensor",
            "Temperature",
            stat_t=stats,
            val_tpl=_template(_value("temperature", "average")),
            dev_cla="temperature",
            unit_of_meas="°C",
            stat_cla="measurement",
            ent_cat="diagnostic",
        )
        for chip in _TEMPERATURES:
            add(
                f"temperature_{chip}",
                "sensor",
                f"Temperature {chip.upper()}",
                stat_t=stats,
                val_tpl=_template(_value("temperature", chip)),
                dev_cla="temperature",
                unit_of_meas="°C",
                stat_cla="measurement",
                ent_cat="diagnostic",
                en=False,
            )
        for memory in _MEMORIES:
            add(
                f"memory_{memory}",
                "sensor",
                f"Memory {memory.replace('_', ' ').upper()}",
                stat_t=stats,
                val_tpl=_template(_value("memory", memory, "percent")),
                unit_of_meas="%",
                stat_cla="measurement",
                ent_cat="diagnostic",
                ic="mdi:memory",
                en=memory in ("ddr", "cmx"),
            )
        for leon in ("css", "mss"):
            add(
                f"leon_{leon}_cpu",
                "sensor",
                f"LEON {leon.upper()} CPU",
                stat_t=stats,
                val_tpl=_template(_value("leon_cpu", leon)),
                unit_of_meas="%",
                stat_cla="measurement",
                ent_cat="diagnostic",
                ic="mdi:chip",
            )
        for stream, nn in sorted(camera.nns.items()):
            self._stream_components(add, mxid, stream, nn)
        return components

    def _stream_components(self, add: Any, mxid: str, stream: str, nn: StreamView) -> None:
        topics = self._topics
        status, counts = topics.nn_status(mxid, stream), topics.counts(mxid, stream)
        attributes = (
            "{'model_name': "
            + _value("model", "name")
            + ", 'sha256': "
            + _value("model", "sha256")
            + ", 'type': "
            + _value("nn_config", "type")
            + ", 'request_id': "
            + _value("request_id")
            + ", 'labels': "
            + _value("labels")
            + "} | tojson"
        )
        add(
            f"{stream}_nn",
            "sensor",
            f"{stream} NN",
            stat_t=status,
            val_tpl=_template(_value("state")),
            dev_cla="enum",
            ops=list(_NN_STATES),
            json_attr_t=status,
            json_attr_tpl=_template(attributes),
            ic="mdi:brain",
        )
        add(
            f"{stream}_remove_nn",
            "button",
            f"{stream} remove NN",
            cmd_t=topics.command(mxid, stream, "delete"),
            # a fresh request_id per press: a repeated one would only be answered again
            cmd_tpl='{"request_id": "homeassistant-{{ now().timestamp() }}"}',
            ent_cat="config",
            ic="mdi:delete",
        )
        add(
            f"{stream}_fps",
            "sensor",
            f"{stream} NN rate",
            stat_t=topics.camera_stats(mxid),
            val_tpl=_template(_value("streams", stream, "fps")),
            unit_of_meas="fps",
            stat_cla="measurement",
            ent_cat="diagnostic",
            ic="mdi:speedometer",
        )
        if nn.type not in COUNTED_TYPES:
            return
        add(
            f"{stream}_objects",
            "sensor",
            f"{stream} objects",
            stat_t=counts,
            val_tpl=_template(_value("total")),
            stat_cla="measurement",
            ic="mdi:counter",
        )
        for label, slug in label_slugs(nn, self._labels):
            literal = jinja_string(label)
            by_label = f"({_value('by_label')} or {{}})"
            present = f"({_value('present')} or [])"
            add(
                f"{stream}_{slug}_count",
                "sensor",
                f"{stream} {label} count",
                stat_t=counts,
                val_tpl=_template(f"{by_label}.get({literal}, 0)"),
                stat_cla="measurement",
                ic="mdi:counter",
            )
            add(
                f"{stream}_{slug}_present",
                "binary_sensor",
                f"{stream} {label}",
                stat_t=counts,
                val_tpl=_template(f"'ON' if {literal} in {present} else 'OFF'"),
                dev_cla="occupancy",
            )

    def camera_config(self, camera: CameraView, gone: Mapping[str, str] | None = None) -> bytes:
        device: dict[str, Any] = {
            "ids": [self.camera_identifier(camera.mxid)],
            "name": camera.name or camera.mxid,
            "mf": MANUFACTURER,
            "mdl": camera.product,
            "sn": camera.mxid,
            "via_device": self.agent_identifier,
        }
        if camera.firmware:
            device["sw"] = camera.firmware
        shared = {
            "avty": [
                {"t": self._topics.availability},
                {"t": self._topics.camera_availability(camera.mxid)},
            ],
            "avty_mode": "all",
        }
        return self._payload(device, self.camera_components(camera), gone, shared=shared)

    # --- both ---------------------------------------------------------------------------

    def _payload(
        self,
        device: Mapping[str, Any],
        components: Mapping[str, Component],
        gone: Mapping[str, str] | None,
        *,
        shared: Mapping[str, Any],
    ) -> bytes:
        cmps: dict[str, Any] = {}
        # a component only with its platform: HA removes the entity it had
        for key, platform in sorted((gone or {}).items()):
            if key not in components:
                cmps[key] = {"p": platform}
        for key, component in components.items():
            cmps[key] = {"p": component.platform, **component.config}
        origin = {"name": ORIGIN_NAME, "sw": self._version}
        return self._encode({"dev": device, "o": origin, **shared, "cmps": cmps})

    def owned(self, topic: str, payload: bytes) -> Owned | None:
        """The retained device config at `topic` if this agent published it, else None."""
        node = self._discovery.node_of(topic)
        if node is None or not payload:
            return None
        try:
            config = msgspec.json.decode(payload, type=_Retained)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        if config.o.name != ORIGIN_NAME:
            return None
        ids = [config.dev.ids] if isinstance(config.dev.ids, str) else config.dev.ids
        for identifier in ids:
            ours, mxid = self.owner(identifier)
            if ours and self.node(identifier) == node:
                return Owned(
                    node=node,
                    mxid=mxid,
                    components={key: c.p for key, c in config.cmps.items()},
                    stubs=frozenset(key for key, c in config.cmps.items() if c.stub),
                )
        return None

    @staticmethod
    def stale(owned: Owned, current: Iterable[str]) -> dict[str, str]:
        """Components a retained config holds that the current one lacks (not yet stubs)."""
        keep = set(current)
        return {
            key: platform
            for key, platform in owned.components.items()
            if key not in keep and key not in owned.stubs
        }


# --- reading back what was published: only what ownership and removal need -----------------


class _RetainedComponent(msgspec.Struct, frozen=True):
    p: str
    uniq_id: str | None = None

    @property
    def stub(self) -> bool:
        return self.uniq_id is None


class _RetainedDevice(msgspec.Struct, frozen=True):
    ids: str | list[str] = []


class _RetainedOrigin(msgspec.Struct, frozen=True):
    name: str = ""


class _Retained(msgspec.Struct, frozen=True):
    dev: _RetainedDevice = _RetainedDevice()
    o: _RetainedOrigin = _RetainedOrigin()
    cmps: dict[str, _RetainedComponent] = {}
