"""Configuration Structs for config/*.toml; unknown keys are errors so typos are caught."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.messages import ObjectSchedule, OutputOptions
from agent.signing import ANY_CAMERA, TrustedKey, read_public_key
from agent.topics import MXID_RE

__all__ = [
    "HA_MAX_LABELS",
    "AgentSection",
    "BrokerSection",
    "Config",
    "ConfigError",
    "DepthaiSection",
    "DownloadSettings",
    "HomeAssistantSection",
    "MetricsSection",
    "ModelsSection",
    "MqttSection",
    "SecurityKey",
    "SecuritySection",
    "SensorKind",
    "SimulatedCamera",
    "SimulatorSection",
    "TlsSection",
    "load_config",
    "locate",
    "split_listen",
    "with_located_files",
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
    # events waiting for the broker; answers are never dropped, reports beyond it are
    event_queue_size: Annotated[int, Meta(ge=1)] = 10_000
    # detection messages waiting for the publisher; newer ones are dropped when full
    detection_queue_size: Annotated[int, Meta(ge=1)] = 1024
    # groups this agent belongs to: it also takes commands on `{prefix}/groups/{group}/nn/...`
    groups: Annotated[tuple[TopicLevel, ...], Meta(max_length=64)] = ()
    # seconds between the retained `{base}/stats` and `{base}/cameras/{mxid}/stats`
    stats_interval: Annotated[float, Meta(ge=1.0, le=86_400.0)] = 30.0


class ModelsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[models]`: chunked uploads over MQTT (`{base}/models/{sha256}/...`)."""

    # an upload with no chunk written for this long is abandoned and its partial deleted
    upload_timeout: Annotated[float, Meta(gt=0.0, le=30 * 86_400.0)] = 3600.0
    # the sizes of all uploads in progress together; a new one beyond it is `storage_full`
    max_partial_bytes: Annotated[int, Meta(ge=4096)] = 256 * 1024 * 1024
    # a stored / failed upload's retained status is cleared (empty retained message) after this
    status_retention: Annotated[float, Meta(ge=0.0, le=30 * 86_400.0)] = 600.0
    # a stored model no camera refers to (not run, to run, nor run before a stream's current
    # one) is removed once unused this long: a deploy naming it by sha256 must come sooner.
    # At least 1 s: a model that comes with its deploy is stored (and the store pruned)
    # just before the deploy refers to it
    keep_unreferenced: Annotated[float, Meta(ge=1.0, le=30 * 86_400.0)] = 300.0


class TlsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[mqtt.tls]`: its presence turns TLS on."""

    # CA certificates to trust; the system trust store when unset
    ca_file: str | None = None
    # client certificate and key for mutual TLS: both or neither
    cert_file: str | None = None
    key_file: str | None = None
    # the name checked in the broker's certificate; [mqtt] host when unset
    server_name: str | None = None
    # testing only: accept any certificate (logged at every connect)
    insecure_skip_verify: bool = False


class MqttSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 1883
    prefix: TopicLevel = "oak"
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    # read at start: its first line, without the newline (instead of `password`)
    password_file: str | None = None
    # "websockets" for brokers that only expose MQTT over WebSockets (often on 443)
    transport: Literal["tcp", "websockets"] = "tcp"
    ws_path: Annotated[str, Meta(pattern=r"^/")] = "/mqtt"
    tls: TlsSection | None = None
    keepalive: Annotated[int, Meta(ge=5, le=3600)] = 30
    # MQTT 5 session expiry; commands sent while the agent is away wait this long
    session_expiry: Annotated[int, Meta(ge=0)] = 86_400
    # MQTT 5 Receive Maximum: commands the broker may send before the agent acknowledged them
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 8
    # a PUBACK overdue while nothing else came from the broker this long ends the connection
    publish_timeout: Annotated[float, Meta(gt=0.0)] = 10.0
    reconnect_min: Annotated[float, Meta(gt=0.0)] = 1.0
    reconnect_max: Annotated[float, Meta(gt=0.0)] = 30.0


class SecurityKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[[security.keys]]`: a key whose signatures the agent trusts."""

    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    # raw Ed25519 public key, standard base64 (checked by `load_config`)
    public_key: str
    # mxids this key may command; "*" for every camera
    cameras: Annotated[
        tuple[Annotated[str, Meta(pattern=f"^(\\*|{MXID_RE.pattern})$")], ...], Meta(min_length=1)
    ] = (ANY_CAMERA,)


class SecuritySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[security]`: signed commands and the audit log."""

    # unsigned commands (and simulator knobs) are rejected `unauthorized`
    require_signed: bool = False
    # a signed command's expires_at may be at most this many seconds ahead
    max_command_age: Annotated[float, Meta(gt=0.0, le=86_400.0)] = 300.0
    # signed request ids kept against replays until their expires_at; beyond, refused
    max_signed_requests: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    keys: tuple[SecurityKey, ...] = ()
    # append every command received and every request's outcome to {state_dir}/audit/
    audit: bool = True
    # the audit file is rotated when a line would take it past this; 5 rotated files kept
    audit_max_bytes: Annotated[int, Meta(ge=1024)] = 10 * 1024 * 1024

    def trusted_keys(self) -> dict[str, TrustedKey]:
        """The keys by id, parsed (the config was checked by `load_config`)."""
        return {
            key.id: TrustedKey(key.id, read_public_key(key.public_key), frozenset(key.cameras))
            for key in self.keys
        }


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
    # instead of them, what the objects knob would set: {frames = [[0, 0], [0], []], loop = true}
    schedule: ObjectSchedule | None = None


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


# `scheme://host/` at least: a prefix without the slash after the host would also allow
# `https://models.example.com.elsewhere.net/...` or `https://models.example.com@elsewhere/`
UrlPrefix = Annotated[str, Meta(pattern=r"^https?://[^/?#@\s]+/[^?#\s]*$", max_length=2048)]


class DownloadSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[download]`: fetching models named by `model_url` in a deploy."""

    # URLs a deploy may name, compared character by character; empty allows any http(s) URL
    allowed_url_prefixes: tuple[UrlPrefix, ...] = ()
    # CA certificates to trust for https; httpx's bundled CA set (certifi) when unset
    ca_file: str | None = None
    # seconds one download may take in all, retries included
    timeout: Annotated[float, Meta(gt=0.0, le=86_400.0)] = 600.0
    # a model larger than this is refused (`payload_too_large`)
    max_model_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024 * 1024


# a topic name (levels separated by /) without wildcards, empty levels or a leading $
DiscoveryPrefix = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
]
HA_MAX_LABELS = 20


class HomeAssistantSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[homeassistant]`: MQTT discovery of the cameras as Home Assistant devices."""

    enabled: bool = False
    discovery_prefix: DiscoveryPrefix = "homeassistant"
    # labels that get count and presence entities; unset: the first 20 of each deploy's labels
    labels: (
        Annotated[
            tuple[Annotated[str, Meta(min_length=1, max_length=256)], ...],
            Meta(max_length=HA_MAX_LABELS),
        ]
        | None
    ) = None


class MetricsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[metrics]`: its presence turns the Prometheus exposition on."""

    # host:port (`[::1]:9464` for IPv6) to serve GET /metrics on
    listen: str = "127.0.0.1:9464"


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`) as (host, port); raise ValueError naming what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{listen!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not 1-65535")
    return host, int(port)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent: AgentSection = AgentSection()
    mqtt: MqttSection = MqttSection()
    broker: BrokerSection = BrokerSection()
    models: ModelsSection = ModelsSection()
    simulator: SimulatorSection | None = None
    # real cameras; the backend when there is no [simulator] section
    depthai: DepthaiSection | None = None
    download: DownloadSettings = DownloadSettings()
    homeassistant: HomeAssistantSection = HomeAssistantSection()
    # how NN output is shaped when a deploy does not say (its `output` fields override these)
    output: OutputOptions = OutputOptions()
    # Prometheus exposition of the stats; off unless the section is there
    metrics: MetricsSection | None = None
    security: SecuritySection = SecuritySection()

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"{self.mqtt.prefix}-{self.agent.id}"

    @property
    def state_path(self) -> Path:
        return Path(self.agent.state_dir)


def _check(config: Config) -> None:
    mqtt = config.mqtt
    if mqtt.password is not None and mqtt.password_file is not None:
        raise ConfigError("mqtt: set password or password_file, not both")
    if mqtt.tls is not None and (mqtt.tls.cert_file is None) != (mqtt.tls.key_file is None):
        raise ConfigError("mqtt.tls: set both cert_file and key_file (mutual TLS), or neither")
    if len(set(config.agent.groups)) != len(config.agent.groups):
        raise ConfigError("agent.groups: a group is named twice")
    if config.metrics is not None:
        try:
            split_listen(config.metrics.listen)
        except ValueError as exc:
            raise ConfigError(f"metrics.listen: {exc}") from None
    _check_security(config.security)
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


def _check_security(security: SecuritySection) -> None:
    seen: set[str] = set()
    for key in security.keys:
        where = f"security.keys[{key.id}]"
        if key.id in seen:
            raise ConfigError(f"{where}: duplicate key id")
        seen.add(key.id)
        try:
            read_public_key(key.public_key)
        except ValueError as exc:
            raise ConfigError(f"{where}.public_key {exc}") from None
    if security.require_signed and not security.keys:
        raise ConfigError(
            "security: require_signed = true needs at least one [[security.keys]] to trust"
        )


def locate(name: str, *, base: Path, credential: bool) -> str:
    """The file a relative path in the config means: in `$CREDENTIALS_DIRECTORY` first when it
    is a credential (systemd `LoadCredential=`), else in `base` (the config file's folder)."""
    path = Path(name)
    if path.is_absolute():
        return name
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credential and credentials and (Path(credentials) / path).is_file():
        return str(Path(credentials) / path)
    return str(base / path)


def with_located_files(mqtt: MqttSection, base: Path) -> MqttSection:
    """`mqtt` with every file it names made absolute (see `locate`)."""
    password_file = mqtt.password_file
    if password_file is not None:
        password_file = locate(password_file, base=base, credential=True)
    tls = mqtt.tls
    if tls is not None:
        tls = msgspec.structs.replace(
            tls,
            ca_file=None
            if tls.ca_file is None
            else locate(tls.ca_file, base=base, credential=False),
            cert_file=None
            if tls.cert_file is None
            else locate(tls.cert_file, base=base, credential=True),
            key_file=None
            if tls.key_file is None
            else locate(tls.key_file, base=base, credential=True),
        )
    return msgspec.structs.replace(mqtt, password_file=password_file, tls=tls)


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
    config = msgspec.structs.replace(config, mqtt=with_located_files(config.mqtt, path.parent))
    if config.download.ca_file is not None:
        ca_file = locate(config.download.ca_file, base=path.parent, credential=False)
        download = msgspec.structs.replace(config.download, ca_file=ca_file)
        config = msgspec.structs.replace(config, download=download)
    state_dir = Path(config.agent.state_dir)
    if not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
        agent = msgspec.structs.replace(config.agent, state_dir=str(state_dir))
        config = msgspec.structs.replace(config, agent=agent)
    return config
