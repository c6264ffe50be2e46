"""Configuration Structs for config/*.toml; unknown keys are errors so typos are caught."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.topics import MXID_RE

__all__ = [
    "AgentSection",
    "BrokerSection",
    "Config",
    "ConfigError",
    "DepthaiSection",
    "MqttSection",
    "SensorKind",
    "SimulatedCamera",
    "SimulatorSection",
    "load_config",
]

AgentId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Mxid = Annotated[str, Meta(pattern=f"^{MXID_RE.pattern}$")]
SensorSocket = Annotated[str, Meta(pattern=r"^CAM_[A-H]$")]
TopicLevel = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Port = Annotated[int, Meta(ge=1, le=65535)]
Seconds = Annotated[float, Meta(ge=0.0, le=3600.0)]
# how long to wait for something before giving up: never zero
Timeout = Annotated[float, Meta(gt=0.0, le=3600.0)]
SensorKind = Literal["color", "mono"]


class ConfigError(Exception):
    """The configuration file is missing, malformed or inconsistent."""


def _default_agent_id() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "oak-agent"


def _default_state_dir() -> str:
    # systemd's StateDirectory= exports the absolute path in STATE_DIRECTORY
    return os.environ.get("STATE_DIRECTORY", "/var/lib/oak-agent").split(":")[0]


class AgentSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: AgentId = msgspec.field(default_factory=_default_agent_id)
    state_dir: str = msgspec.field(default_factory=_default_state_dir)
    # inbound command payloads above this are answered `payload_too_large`
    max_payload_bytes: Annotated[int, Meta(ge=1024)] = 32 * 1024 * 1024
    # events kept while the broker is unreachable; the oldest go first when full
    event_queue_size: Annotated[int, Meta(ge=1)] = 10_000
    # detection messages waiting for the publisher; newer ones are dropped when full
    detection_queue_size: Annotated[int, Meta(ge=1)] = 1024


class MqttSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 1883
    prefix: TopicLevel = "oak"
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: Annotated[int, Meta(ge=5, le=3600)] = 30
    # MQTT 5 session expiry; commands sent while the agent is away wait this long
    session_expiry: Annotated[int, Meta(ge=0)] = 86_400
    # MQTT 5 Receive Maximum: commands the broker may send before the agent acknowledged them
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 8
    publish_timeout: Annotated[float, Meta(gt=0.0)] = 10.0
    reconnect_min: Annotated[float, Meta(gt=0.0)] = 1.0
    reconnect_max: Annotated[float, Meta(gt=0.0)] = 30.0


class BrokerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # run an in-process amqtt broker on [mqtt] host:port (demo only: MQTT 3.1.1, ~half speed)
    embedded: bool = False


class SimulatedCamera(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mxid: Mxid
    name: str = ""
    sensors: dict[SensorSocket, SensorKind] = msgspec.field(
        default_factory=lambda: {"CAM_A": "color", "CAM_B": "mono", "CAM_C": "mono"}
    )
    stereo: tuple[tuple[SensorSocket, SensorSocket], ...] = ()
    boot_seconds: Seconds = 2.0
    fps: Annotated[float, Meta(gt=0.0, le=1000.0)] = 10.0
    # synthetic objects per frame from YOLO and MobileNet networks
    objects: Annotated[int, Meta(ge=0, le=100)] = 3


class SimulatorSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cameras: tuple[SimulatedCamera, ...] = ()


class DepthaiSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    # mxids to drive; empty drives every camera found
    allow: tuple[Mxid, ...] = ()
    # mxid -> display name
    names: dict[Mxid, str] = {}
    # PoE cameras outside the broadcast domain, probed by address
    poe_addresses: tuple[str, ...] = ()
    # one attempt to open the device with the pipeline
    boot_timeout: Timeout = 30.0
    # after booting, every NN must produce one output within this
    first_output_timeout: Timeout = 20.0
    boot_retries: Annotated[int, Meta(ge=1, le=20)] = 3
    # seconds between discovery scans (each costs a ~0.5 s subprocess)
    discovery_interval: Annotated[float, Meta(ge=1.0, le=3600.0)] = 5.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent: AgentSection = AgentSection()
    mqtt: MqttSection = MqttSection()
    broker: BrokerSection = BrokerSection()
    simulator: SimulatorSection | None = None
    # real cameras; the backend when there is no [simulator] section
    depthai: DepthaiSection | None = None

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"{self.mqtt.prefix}-{self.agent.id}"

    @property
    def state_path(self) -> Path:
        return Path(self.agent.state_dir)


def _check(config: Config) -> None:
    if config.simulator is not None and config.depthai is not None:
        raise ConfigError("[simulator] and [depthai] exclude each other: choose one backend")
    if config.simulator is None:
        return
    seen: set[str] = set()
    for camera in config.simulator.cameras:
        where = f"simulator.cameras[{camera.mxid}]"
        if camera.mxid in seen:
            raise ConfigError(f"{where}: duplicate mxid")
        seen.add(camera.mxid)
        if not camera.sensors:
            raise ConfigError(f"{where}.sensors: at least one sensor is required")
        for left, right in camera.stereo:
            missing = [s for s in (left, right) if s not in camera.sensors]
            if missing:
                raise ConfigError(f"{where}.stereo: {', '.join(missing)} is not in sensors")
            if left == right:
                raise ConfigError(f"{where}.stereo: a pair needs two different sensors")


def load_config(path: Path) -> Config:
    """Read and validate a TOML config; relative state_dir is taken from the file's folder."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        config = msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _check(config)
    state_dir = Path(config.agent.state_dir)
    if not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
        agent = msgspec.structs.replace(config.agent, state_dir=str(state_dir))
        config = msgspec.structs.replace(config, agent=agent)
    return config
