"""Wire schema: commands in, events, status and detections out.

Inbound Structs accept unknown top-level keys so that newer senders interoperate with older
agents; the NNConfig blocks forbid them, because a misspelt threshold must not be ignored.
New fields get defaults; nothing is renamed or retyped.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta

from agent.errors import AgentError, ErrorInfo, InvalidPayload, clip
from agent.limits import json_problem, msgpack_problem, payload_format, utf8_problem
from agent.topics import STREAM_RE
from agent.vocab import (
    TERMINAL_STATES,
    Action,
    CameraStateName,
    NNStateName,
    RequestState,
    UploadStateName,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "AgentErrorEvent",
    "AgentHealth",
    "CameraHealth",
    "CameraStats",
    "CameraStatus",
    "CommandCounts",
    "CountsMessage",
    "DeleteCommand",
    "Deploy",
    "DeployCommand",
    "Detection",
    "DetectionsMessage",
    "DeviceMemory",
    "ErrorInfo",
    "Event",
    "GenericConfig",
    "GroupTarget",
    "Info",
    "InfoCamera",
    "Layer",
    "LeonCpu",
    "LinkCounters",
    "MemoryUse",
    "MobileNetConfig",
    "MobileNetOptions",
    "ModelByHash",
    "ModelEntry",
    "ModelRef",
    "ModelUpload",
    "ModelUrl",
    "NNConfig",
    "NNStatus",
    "NNSummary",
    "ObjectSchedule",
    "OutputOptions",
    "OutputSpec",
    "Progress",
    "ReplyTo",
    "SimObject",
    "Spatial",
    "StreamHealth",
    "Temperatures",
    "UploadManifest",
    "UploadStatus",
    "YoloConfig",
    "YoloOptions",
    "decode_delete",
    "decode_deploy",
    "decode_group_delete",
    "decode_group_deploy",
    "decode_manifest",
    "decode_objects",
    "encode_json",
    "salvage_request_id",
]

_T = TypeVar("_T")

# bounds on everything a sender controls, so that one command cannot bloat the state file,
# the retained status or the decoder's work; ge/le on a float also refuse NaN and infinities
MAX_LABELS: Final = 1000
MAX_LABEL_BYTES: Final = 64 * 1024
MAX_NN_CONFIG_CHARS: Final = 64 * 1024
MAX_URL_CHARS: Final = 8192  # presigned URLs run to about 2,000 characters

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
UnixSeconds = Annotated[float, Meta(ge=0.0, le=1e11, description="finite unix seconds")]
Anchor = Annotated[float, Meta(ge=0.0, le=100_000.0)]
MaskName = Annotated[str, Meta(min_length=1, max_length=64)]
AnchorMask = Annotated[tuple[Annotated[int, Meta(ge=0, le=999)], ...], Meta(max_length=64)]
Label = Annotated[str, Meta(max_length=256)]
RequestId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]
Threads = Annotated[int, Meta(ge=0, le=2, description="0 lets the device choose")]
CameraRef = Annotated[str, Meta(min_length=1, max_length=256, description="`*`, mxid or name")]
Stream = Annotated[str, Meta(pattern=f"^(?:{STREAM_RE.pattern})$")]
MAX_TARGET_CAMERAS: Final = 1000


# --- NNConfig: the REST API's config, one Struct per `type` ------------------------------


class YoloOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    num_classes: Annotated[int, Meta(gt=0, le=100_000)]
    coordinate_size: Annotated[int, Meta(ge=4, le=64)] = 4
    anchors: Annotated[tuple[Anchor, ...], Meta(max_length=1000)] = ()
    anchor_masks: Annotated[dict[MaskName, AnchorMask], Meta(max_length=64)] = {}
    iou_threshold: Probability = 0.5
    confidence_threshold: Probability = 0.5


class MobileNetOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    confidence_threshold: Probability = 0.5


class GenericOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Generic networks take no type-specific options; any key here is an error."""


class _NNConfigBase(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"
):
    num_inference_threads: Threads = 2


class GenericConfig(_NNConfigBase, frozen=True, tag="Generic"):
    nn_config: GenericOptions | None = None


class YoloConfig(_NNConfigBase, frozen=True, tag="YOLO"):
    nn_config: YoloOptions


class MobileNetConfig(_NNConfigBase, frozen=True, tag="MobileNet"):
    nn_config: MobileNetOptions = MobileNetOptions()


NNConfig = GenericConfig | YoloConfig | MobileNetConfig


# --- output shaping: host-side, so changing it never restarts a camera ---------------------

Rate = Annotated[float, Meta(ge=0.0, le=10_000.0, description="messages per second")]
PositiveRate = Annotated[float, Meta(gt=0.0, le=10_000.0, description="messages per second")]
OnFrames = Annotated[int, Meta(ge=1, le=10_000)]
OffSeconds = Annotated[float, Meta(gt=0.0, le=86_400.0)]


class OutputOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How one NN's output is published: the deploy's `output` over the agent's `[output]`."""

    # per-frame messages per second on .../nn/detections; None: every frame; 0: none
    max_rate: Rate | None = None
    # detections below this are dropped before counting and publishing; None: all
    min_confidence: Probability | None = None
    # counts messages per second at most; a change held back goes out when the window opens
    counts_max_rate: PositiveRate = 2.0
    # a label is present after this many consecutive frames with it...
    on_frames: OnFrames = 2
    # ... and absent after this long without it
    off_seconds: OffSeconds = 3.0


class OutputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A deploy's `output` as sent: the fields it leaves out keep the agent's defaults."""

    max_rate: Rate | msgspec.UnsetType | None = msgspec.UNSET
    min_confidence: Probability | msgspec.UnsetType | None = msgspec.UNSET
    counts_max_rate: PositiveRate | msgspec.UnsetType = msgspec.UNSET
    on_frames: OnFrames | msgspec.UnsetType = msgspec.UNSET
    off_seconds: OffSeconds | msgspec.UnsetType = msgspec.UNSET

    def over(self, defaults: OutputOptions) -> OutputOptions:
        """These options, each one left out taken from `defaults`."""
        given = {
            name: value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not msgspec.UNSET
        }
        return msgspec.structs.replace(defaults, **given)


# --- commands ------------------------------------------------------------------------------


class DeployCommand(msgspec.Struct, frozen=True, kw_only=True):
    # the REST API took nn_config as a stringified form field; a JSON string is accepted too
    nn_config: NNConfig | Annotated[str, Meta(max_length=MAX_NN_CONFIG_CHARS)]
    request_id: RequestId | None = None
    model: bytes | None = None
    model_sha256: Sha256Hex | None = None
    # http(s) URL to download the model from (with model_sha256, and model_size if known)
    model_url: Annotated[str, Meta(min_length=1, max_length=MAX_URL_CHARS)] | None = None
    model_size: Annotated[int, Meta(ge=1, le=1 << 40)] | None = None
    model_name: Annotated[str, Meta(max_length=256)] | None = None
    # at most MAX_LABEL_BYTES in total as well: checked after decoding
    labels: Annotated[tuple[Label, ...], Meta(max_length=MAX_LABELS)] | None = None
    expires_at: UnixSeconds | None = None
    output: OutputSpec | None = None


class DeleteCommand(msgspec.Struct, frozen=True):
    request_id: RequestId | None = None
    expires_at: UnixSeconds | None = None


class GroupTarget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which cameras of each agent in the group a group command is for, and which stream."""

    # ["*"] for every camera that has `stream`, or mxids and camera names
    cameras: Annotated[tuple[CameraRef, ...], Meta(min_length=1, max_length=MAX_TARGET_CAMERAS)]
    stream: Stream

    @property
    def everything(self) -> bool:
        return self.cameras == ("*",)


class GroupDeployCommand(DeployCommand, frozen=True, kw_only=True):
    target: GroupTarget


class GroupDeleteCommand(DeleteCommand, frozen=True, kw_only=True):
    target: GroupTarget


class _RequestIdOnly(msgspec.Struct, frozen=True):
    request_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class ModelUpload(msgspec.Struct, frozen=True):
    """A model sent inline, with the sender's sha256 to check it against, if given."""

    data: bytes  # never empty
    sha256: str | None = None  # lower case


class ModelByHash(msgspec.Struct, frozen=True):
    """A model already in the store, named by its sha256."""

    sha256: str  # lower case


class ModelUrl(msgspec.Struct, frozen=True):
    """A model to download (`model_url`), checked against its sha256 (and size, if given)."""

    url: str  # may hold credentials: never logged as it is (agent.download.redact_url)
    sha256: str  # lower case
    size: int | None = None


class Deploy(msgspec.Struct, frozen=True, kw_only=True):
    """A deploy command as `decode_deploy` returns it: nn_config parsed, the model's source
    named; the types say what the decoder checked."""

    nn_config: NNConfig
    model: ModelUpload | ModelByHash | ModelUrl
    request_id: str | None = None
    model_name: str | None = None
    labels: tuple[str, ...] | None = None
    expires_at: float | None = None
    output: OutputSpec | None = None


_json_deploy: Final = msgspec.json.Decoder(DeployCommand)
_msgpack_deploy: Final = msgspec.msgpack.Decoder(DeployCommand)
_json_delete: Final = msgspec.json.Decoder(DeleteCommand)
_msgpack_delete: Final = msgspec.msgpack.Decoder(DeleteCommand)
_json_group_deploy: Final = msgspec.json.Decoder(GroupDeployCommand)
_msgpack_group_deploy: Final = msgspec.msgpack.Decoder(GroupDeployCommand)
_json_group_delete: Final = msgspec.json.Decoder(GroupDeleteCommand)
_msgpack_group_delete: Final = msgspec.msgpack.Decoder(GroupDeleteCommand)
_json_nn_config: Final = msgspec.json.Decoder(NNConfig)
_json_request_id: Final = msgspec.json.Decoder(_RequestIdOnly)
_msgpack_request_id: Final = msgspec.msgpack.Decoder(_RequestIdOnly)


_WHERE = re.compile(r" - at (`key` in )?`(\$[^`]*)`$")


def _invalid(exc: msgspec.MsgspecError, *, under: str = "") -> InvalidPayload:
    """Turn a msgspec error into InvalidPayload carrying the failing field's path.

    msgspec 0.19 gives the path only inside the message text (` - at `$.a.b``; no attribute,
    msgspec issue #264 is still open), so this is the one place that reads it from the text.
    """
    text = str(exc)
    match = _WHERE.search(text)
    if match is None:
        return InvalidPayload(clip(text, 200), path=under or "$")
    # msgspec quotes the input in some reasons (an unknown tag, an unknown field's name)
    reason = clip(text[: match.start()], 200) + (" (in a map key)" if match.group(1) else "")
    path = match.group(2)
    if under:
        path = under + path[1:]
    return InvalidPayload(reason, path=path)


def _decode(payload: bytes, json: msgspec.json.Decoder[_T], mp: msgspec.msgpack.Decoder[_T]) -> _T:
    """Decode untrusted bytes; whatever they hold, only InvalidPayload comes out."""
    kind = payload_format(payload)
    msgpack = kind == "msgpack_map"
    decoder: Callable[[bytes], _T]
    if kind == "json_object":
        problem, decoder = json_problem(payload), json.decode
    elif msgpack:
        problem, decoder = msgpack_problem(payload), mp.decode
    else:
        raise InvalidPayload("payload is neither a JSON object nor a MessagePack map", path="$")
    if problem is not None:
        raise InvalidPayload(problem, path="$")
    try:
        return decoder(payload)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from exc
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"malformed payload ({clip(str(exc), 200)})", path="$") from exc
    except UnicodeDecodeError as exc:  # msgspec checks UTF-8 only in the strings it keeps
        problem = utf8_problem(payload, msgpack=msgpack)
        raise InvalidPayload(problem, path="$") from exc
    except RecursionError as exc:  # not reached with the depth check; kept as a backstop
        raise InvalidPayload("nesting is too deep", path="$") from exc


def _nn_config(text: str) -> NNConfig:
    """Decode the NNConfig given as a JSON string (the REST API's form field)."""
    raw = text.encode()
    problem = json_problem(raw)
    if problem is not None:
        raise InvalidPayload(problem, path="$.nn_config")
    try:
        nn_config: NNConfig = _json_nn_config.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, under="$.nn_config") from exc
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"not a JSON object ({exc})", path="$.nn_config") from exc
    except RecursionError as exc:  # a backstop, as in _decode
        raise InvalidPayload("nesting is too deep", path="$.nn_config") from exc
    return nn_config


def decode_deploy(payload: bytes) -> Deploy:
    """Decode a deploy command (JSON object or MessagePack map); raise InvalidPayload."""
    return _deploy(_decode(payload, _json_deploy, _msgpack_deploy))


def _deploy(command: DeployCommand) -> Deploy:
    nn_config = command.nn_config
    if isinstance(nn_config, str):
        nn_config = _nn_config(nn_config)
    sha256 = command.model_sha256.lower() if command.model_sha256 is not None else None
    model: ModelUpload | ModelByHash | ModelUrl
    if command.model_url is not None:
        if command.model is not None:
            raise InvalidPayload("give model or model_url, not both", path="$.model_url")
        if sha256 is None:
            raise InvalidPayload("model_url needs model_sha256", path="$.model_sha256")
        model = ModelUrl(command.model_url, sha256, command.model_size)
    elif command.model is not None:
        if not command.model:
            raise InvalidPayload("model is empty", path="$.model")
        model = ModelUpload(command.model, sha256)
    elif sha256 is not None:
        model = ModelByHash(sha256)
    else:
        raise InvalidPayload("either model or model_sha256 is required", path="$.model")
    if command.labels:
        total = sum(len(label.encode()) for label in command.labels)
        if total > MAX_LABEL_BYTES:
            raise InvalidPayload(
                f"labels hold {total} bytes in total; at most {MAX_LABEL_BYTES}", path="$.labels"
            )
    return Deploy(
        nn_config=nn_config,
        model=model,
        request_id=command.request_id,
        model_name=command.model_name,
        labels=command.labels,
        expires_at=command.expires_at,
        output=command.output,
    )


def decode_delete(payload: bytes) -> DeleteCommand:
    """Decode a delete command: empty, a JSON object or a MessagePack map."""
    if not payload.strip():
        return DeleteCommand()
    return _decode(payload, _json_delete, _msgpack_delete)


def _target(target: GroupTarget) -> GroupTarget:
    if "*" in target.cameras and not target.everything:
        raise InvalidPayload('"*" stands alone: it means every camera', path="$.target.cameras")
    return target


def decode_group_deploy(payload: bytes) -> tuple[Deploy, GroupTarget]:
    """Decode a group deploy: a deploy command plus its `target`; raise InvalidPayload."""
    command = _decode(payload, _json_group_deploy, _msgpack_group_deploy)
    return _deploy(command), _target(command.target)


def decode_group_delete(payload: bytes) -> tuple[DeleteCommand, GroupTarget]:
    """Decode a group delete: `target` and optionally request_id and expires_at."""
    if not payload.strip():
        raise InvalidPayload("a group command needs a target", path="$.target")
    command = _decode(payload, _json_group_delete, _msgpack_group_delete)
    delete = DeleteCommand(request_id=command.request_id, expires_at=command.expires_at)
    return delete, _target(command.target)


# --- chunked model uploads -----------------------------------------------------------------

MIN_CHUNK_SIZE: Final = 4096
MAX_MODEL_SIZE: Final = 1 << 40  # a bound on the number, not a limit of the agent's disk


class UploadManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What `{base}/models/{sha256}/upload` announces; also kept beside the partial file."""

    size: Annotated[int, Meta(ge=1, le=MAX_MODEL_SIZE)]
    # every chunk but the last has exactly this many bytes; at most agent.max_payload_bytes
    chunk_size: Annotated[int, Meta(ge=MIN_CHUNK_SIZE, le=MAX_MODEL_SIZE)]
    request_id: RequestId | None = None
    model_name: Annotated[str, Meta(max_length=256)] | None = None
    expires_at: UnixSeconds | None = None


_json_manifest: Final = msgspec.json.Decoder(UploadManifest)
_msgpack_manifest: Final = msgspec.msgpack.Decoder(UploadManifest)


def decode_manifest(payload: bytes) -> UploadManifest:
    """Decode an upload manifest (JSON object or MessagePack map); raise InvalidPayload."""
    return _decode(payload, _json_manifest, _msgpack_manifest)


def salvage_request_id(payload: bytes) -> str | None:
    """Best effort: the request_id of a payload that failed validation, to echo it back.

    Guarded like the decoders, so a payload that broke them cannot break this too.
    """
    try:
        return _decode(payload, _json_request_id, _msgpack_request_id).request_id
    except AgentError:
        return None


# --- events and status ---------------------------------------------------------------------


class ReplyTo(msgspec.Struct, frozen=True):
    """An MQTT 5 Response Topic with the Correlation Data to copy back with each event."""

    topic: str
    correlation_data: bytes | None = None


class Progress(msgspec.Struct, frozen=True):
    """How much of a model a `transferring` request has: bytes received, of `total`."""

    received: int
    total: int | None = None  # unknown for a download whose size was not given


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    action: Action
    camera: str
    stream: str
    state: RequestState
    ts: float
    error: ErrorInfo | None = None
    # on `superseded`: the request that replaced this one
    superseded_by: str | None = None
    # the group the command was sent to; with camera "" an answer of the agent as a whole
    # (`skipped`, or `rejected` before any camera was chosen)
    group: str | None = None
    # on `transferring`: how far its model has come
    progress: Progress | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class AgentErrorEvent(msgspec.Struct, frozen=True):
    """A problem of the agent itself, not of one request (published on `{base}/errors`)."""

    code: str
    message: str
    ts: float


class ModelRef(msgspec.Struct, frozen=True, omit_defaults=True):
    sha256: str
    size: int
    name: str | None = None


class UploadStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """The retained `{base}/models/{sha256}/status` of a chunked upload."""

    state: UploadStateName
    size: int
    received: int
    # [start, end) byte ranges not received yet, at most MAX_MISSING_RANGES of them
    missing: tuple[tuple[int, int], ...]
    updated_at: float
    chunk_size: int | None = None
    missing_truncated: bool = False
    request_id: str | None = None
    error: ErrorInfo | None = None


class ModelEntry(msgspec.Struct, frozen=True):
    """One model of the retained `{base}/models` list."""

    sha256: str
    size: int
    name: str | None
    stored_at: float
    last_used: float
    in_use_by: tuple[str, ...]  # "mxid/stream" of the NNs that run it or will
    # "mxid/stream" that ran it before their current model: kept for a rollback
    # (absent from agents before it was kept)
    previous_for: tuple[str, ...] = ()


class NNStatus(msgspec.Struct, frozen=True):
    state: NNStateName
    model: ModelRef | None = None
    nn_config: NNConfig | None = None
    labels: tuple[str, ...] | None = None
    request_id: str | None = None
    updated_at: float = 0.0
    error: ErrorInfo | None = None
    # how the output is shaped (with the agent's defaults filled in)
    output: OutputOptions | None = None


class NNSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    state: NNStateName
    type: str | None = None
    model_sha256: str | None = None
    model_name: str | None = None


class CameraStats(msgspec.Struct, frozen=True):
    """A camera's counters since the agent started; published as they stood, never alone."""

    # NN results the camera handed on to be published
    outputs: int = 0
    # results dropped before that because the agent fell behind reading them
    dropped: int = 0
    # device messages skipped because they could not be read as a result
    unreadable: int = 0


class CameraStatus(msgspec.Struct, frozen=True):
    state: CameraStateName
    name: str
    streams: tuple[str, ...]
    nn: dict[str, NNSummary]
    restarts: int
    last_error: ErrorInfo | None = None
    updated_at: float = 0.0
    # filled when the status is published; a change of counters alone publishes nothing
    stats: CameraStats = CameraStats()


class InfoCamera(msgspec.Struct, frozen=True):
    mxid: str
    name: str
    streams: tuple[str, ...]
    stats: CameraStats = CameraStats()


class LinkCounters(msgspec.Struct, frozen=True):
    """What the MQTT link counted since the agent started, as of the `info` it is part of."""

    connects: int = 0
    commands_acknowledged: int = 0
    events_sent: int = 0
    events_dropped: int = 0  # the event queue was full: the oldest went
    detections_sent: int = 0
    detections_dropped_disconnected: int = 0
    detections_dropped_backpressure: int = 0
    retained_sent: int = 0


class Info(msgspec.Struct, frozen=True):
    agent_id: str
    version: str
    depthai_version: str
    backend: str
    cameras: tuple[InfoCamera, ...]
    started_at: float
    # counted by the link; filled each time `info` is published (no publish of its own)
    link: LinkCounters = LinkCounters()
    # the groups whose commands the agent takes (`agent.groups`)
    groups: tuple[str, ...] = ()


# --- detections ----------------------------------------------------------------------------


class Spatial(msgspec.Struct, frozen=True):
    x: float
    y: float
    z: float


class Detection(msgspec.Struct, frozen=True, omit_defaults=True):
    label: int
    confidence: float
    coords: tuple[float, float, float, float]
    label_name: str | None = None
    spatial_coords: Spatial | None = None


class Layer(msgspec.Struct, frozen=True):
    name: str
    dims: tuple[int, ...]
    dtype: str
    # a flat numpy array when produced (encoded through `encode_json`), a list when decoded
    data: Any


class DetectionsMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    camera: str
    stream: str
    seq: int
    ts: float
    device_ts: float
    model_sha256: str
    type: str
    detections: tuple[Detection, ...] | None = None
    layers: tuple[Layer, ...] | None = None


# --- shaped outputs and health ---------------------------------------------------------------


class CountsMessage(msgspec.Struct, frozen=True):
    """`.../nn/counts`, retained: objects in the latest frame per label, and who is present."""

    total: int
    # label name (or index as a string when no labels were given) -> objects in the frame;
    # a label seen once stays, at 0
    by_label: dict[str, int]
    present: tuple[str, ...]
    ts: float
    # this stream's counts messages since its NN started: 1, 2, ...
    seq: int
    # the sequence number of the frame counted
    frame_seq: int = 0


class Temperatures(msgspec.Struct, frozen=True):
    """Chip temperatures in degrees Celsius; null when unknown."""

    average: float | None = None
    css: float | None = None
    mss: float | None = None
    upa: float | None = None
    dss: float | None = None


class MemoryUse(msgspec.Struct, frozen=True):
    used: int | None = None  # bytes
    total: int | None = None  # bytes
    percent: float | None = None


class DeviceMemory(msgspec.Struct, frozen=True):
    ddr: MemoryUse = MemoryUse()
    cmx: MemoryUse = MemoryUse()
    leon_css_heap: MemoryUse = MemoryUse()
    leon_mss_heap: MemoryUse = MemoryUse()


class LeonCpu(msgspec.Struct, frozen=True):
    css: float | None = None  # percent
    mss: float | None = None


class StreamHealth(msgspec.Struct, frozen=True):
    fps: float | None = None  # NN results per second reaching the agent
    dropped: int = 0  # results not published because the agent fell behind, since it started


class CameraHealth(msgspec.Struct, frozen=True):
    """`{base}/cameras/{mxid}/stats`, retained; device fields null until the device reports."""

    ts: float
    uptime: float | None = None  # seconds since the camera last booted
    temperature: Temperatures = Temperatures()
    memory: DeviceMemory = DeviceMemory()
    leon_cpu: LeonCpu = LeonCpu()
    streams: dict[str, StreamHealth] = {}


class CommandCounts(msgspec.Struct, frozen=True):
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    superseded: int = 0


class AgentHealth(msgspec.Struct, frozen=True):
    """`{base}/stats`, retained."""

    ts: float
    uptime: float  # seconds since the agent started
    cpu_percent: float | None  # of one core, since the previous stats
    rss_bytes: int | None
    loop_lag_max_ms: float  # the event loop's worst lag since the previous stats
    messages_published: int
    detections_dropped: int
    commands: CommandCounts = CommandCounts()


# --- simulator knob: scheduled objects -------------------------------------------------------


class SimObject(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    label: Annotated[int, Meta(ge=0, le=100_000)]
    confidence: Probability = 0.9


SimFrame = Annotated[
    tuple[Annotated[int, Meta(ge=0, le=100_000)] | SimObject, ...], Meta(max_length=100)
]


class ObjectSchedule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`{base}/simulator/cameras/{mxid}/objects`: what every detector NN of the camera sees.

    Frame i shows the objects of `frames[i]` (a label, or `{label, confidence}`); after the
    last frame the schedule starts again (`loop`) or its last frame stays.
    """

    frames: Annotated[tuple[SimFrame, ...], Meta(min_length=1, max_length=10_000)]
    loop: bool = True


_json_objects: Final = msgspec.json.Decoder(ObjectSchedule)


def decode_objects(payload: bytes) -> ObjectSchedule | None:
    """Decode the simulator's objects knob; empty: back to the default moving objects."""
    if not payload.strip():
        return None
    problem = json_problem(payload)
    if problem is not None:
        raise InvalidPayload(problem, path="$")
    try:
        return _json_objects.decode(payload)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from exc
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"malformed payload ({clip(str(exc), 200)})", path="$") from exc
    except UnicodeDecodeError as exc:
        raise InvalidPayload(utf8_problem(payload, msgpack=False), path="$") from exc
    except RecursionError as exc:
        raise InvalidPayload("nesting is too deep", path="$") from exc


def _enc_hook(obj: object) -> object:
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if tolist is not None:
        return tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


encode_json: Final = msgspec.json.Encoder(enc_hook=_enc_hook).encode
