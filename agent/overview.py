"""What `oak-agent status` shows: every agent, camera and stream under a prefix, from the
retained topics alone (so it works against any agent on the broker, running or not).

Pure: retained payloads in, rows and their text out. Payloads are read loosely (unknown
fields ignored, a payload that does not decode counts as absent), and every value shown is
stripped of control characters: retained topics are anyone's to write.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["COLUMNS", "Row", "filters", "plain_table", "rich_table", "rows", "to_json"]

COLUMNS: Final = (
    "AGENT",
    "CAMERA",
    "STATE",
    "STREAM",
    "NN",
    "MODEL",
    "OBJECTS",
    "PRESENT",
    "TEMP",
    "LAST ERROR",
)
# control characters, the Unicode line and paragraph separators (a line break to many
# viewers) and the bidirectional overrides (they reorder what a terminal shows)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_MAX_CELL: Final = 48


@dataclass(frozen=True, slots=True)
class Row:
    agent: str
    camera: str
    state: str
    stream: str
    nn: str
    model: str
    objects: str
    present: str
    temperature: str
    last_error: str

    def cells(self) -> tuple[str, ...]:
        return (
            self.agent,
            self.camera,
            self.state,
            self.stream,
            self.nn,
            self.model,
            self.objects,
            self.present,
            self.temperature,
            self.last_error,
        )


# --- the retained payloads, read loosely ------------------------------------------------------


class _InfoCamera(msgspec.Struct):
    mxid: str
    name: str = ""


class _Info(msgspec.Struct):
    version: str = ""
    cameras: list[_InfoCamera] = []


class _Error(msgspec.Struct):
    code: str = ""
    message: str = ""


class _CameraStatus(msgspec.Struct):
    state: str = ""
    name: str = ""
    last_error: _Error | None = None


class _Model(msgspec.Struct):
    sha256: str = ""
    name: str | None = None


class _NNStatus(msgspec.Struct):
    state: str = ""
    model: _Model | None = None


class _Counts(msgspec.Struct):
    total: int | None = None
    present: list[str] = []


class _Temperature(msgspec.Struct):
    average: float | None = None


class _CameraStats(msgspec.Struct):
    temperature: _Temperature | None = None


def _decode(payload: bytes | None, kind: type[Any]) -> Any:
    if not payload:
        return None
    try:
        return msgspec.json.decode(payload, type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def _clean(text: str) -> str:
    text = _CONTROL.sub("?", text)
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def filters(prefix: str, agent: str | None) -> tuple[str, ...]:
    """The topic filters whose retained messages make the overview."""
    base = f"{prefix}/{agent or '+'}"
    camera = f"{base}/cameras/+"
    return (
        f"{base}/availability",
        f"{base}/info",
        f"{camera}/availability",
        f"{camera}/status",
        f"{camera}/stats",
        f"{camera}/streams/+/nn/status",
        f"{camera}/streams/+/nn/counts",
    )


def rows(prefix: str, retained: Mapping[str, bytes]) -> list[Row]:
    """One row per stream with an NN (one per camera without), agents and cameras sorted."""
    tree: dict[str, dict[str, dict[str, bytes]]] = {}  # agent -> camera ("" = agent) -> rest
    start = prefix + "/"
    for topic, payload in retained.items():
        if not topic.startswith(start):
            continue
        agent, _, rest = topic[len(start) :].partition("/")
        camera = ""
        if rest.startswith("cameras/"):
            camera, _, rest = rest[len("cameras/") :].partition("/")
        tree.setdefault(agent, {}).setdefault(camera, {})[rest] = payload
    result: list[Row] = []
    for agent in sorted(tree):
        own = tree[agent].get("", {})
        info = _decode(own.get("info"), _Info)
        online = own.get("availability") == b"online"
        label = f"{agent} ({'online' if online else 'offline'})"
        names = {c.mxid: c.name for c in info.cameras} if info is not None else {}
        cameras = sorted(set(tree[agent]) - {""} | set(names))
        if not cameras:
            result.append(Row(_clean(label), "-", "-", "-", "-", "-", "-", "-", "-", "-"))
        for mxid in cameras:
            result += _camera_rows(_clean(label), mxid, names.get(mxid), tree[agent].get(mxid, {}))
    return result


def _camera_rows(agent: str, mxid: str, name: str | None, topics: Mapping[str, bytes]) -> list[Row]:
    status = _decode(topics.get("status"), _CameraStatus)
    stats = _decode(topics.get("stats"), _CameraStats)
    state = status.state if status is not None and status.state else "?"
    if topics.get("availability") == b"offline":
        state = "offline"
    shown = name or (status.name if status is not None else "") or ""
    camera = f"{shown} ({mxid})" if shown and shown != mxid else mxid
    average = stats.temperature.average if stats is not None and stats.temperature else None
    temperature = "-" if average is None else f"{average:.1f} °C"
    error = "-"
    if status is not None and status.last_error is not None:
        error = status.last_error.code or "?"
    streams: dict[str, tuple[Any, Any]] = {}
    for rest, payload in topics.items():
        parts = rest.split("/")
        if len(parts) == 4 and parts[0] == "streams" and parts[2] == "nn":
            stream, kind = parts[1], parts[3]
            nn, counts = streams.get(stream, (None, None))
            if kind == "status":
                nn = _decode(payload, _NNStatus)
            elif kind == "counts":
                counts = _decode(payload, _Counts)
            streams[stream] = (nn, counts)
    result = []
    common = (agent, _clean(camera), _clean(state))
    for stream in sorted(streams):
        nn, counts = streams[stream]
        if nn is None or nn.state in ("", "none"):
            continue
        model = "-"
        if nn.model is not None:
            model = nn.model.name or nn.model.sha256[:12] or "-"
        objects = present = "-"
        if counts is not None:
            objects = "-" if counts.total is None else str(counts.total)
            present = ", ".join(counts.present) or "none"
        result.append(
            Row(
                *common,
                _clean(stream),
                _clean(nn.state),
                _clean(model),
                _clean(objects),
                _clean(present),
                temperature,
                _clean(error),
            )
        )
    if not result:
        result.append(Row(*common, "-", "none", "-", "-", "-", temperature, _clean(error)))
    return result


# --- text ------------------------------------------------------------------------------------


def plain_table(table: list[Row]) -> str:
    """Columns padded with spaces; one line per row (for pipes, files and tests)."""
    lines = [COLUMNS, *(row.cells() for row in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def rich_table(table: list[Row]) -> Any:
    """A rich Table (rich is imported only here, when a terminal shows it)."""
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    shown = Table(*COLUMNS, title="oak-agent status", header_style="bold")
    for row in table:
        shown.add_row(*(Text(cell) for cell in row.cells()))  # Text: no markup read from topics
    return shown


def to_json(table: list[Row]) -> bytes:
    return msgspec.json.encode([asdict(row) for row in table])
