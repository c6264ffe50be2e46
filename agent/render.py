"""How `oak-agent watch` shows a payload: JSON pretty or compact, text as is, binary summarised.

Pure functions over bytes; whatever arrives is shown without raising and without writing
control bytes to the terminal.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec

from agent.limits import json_problem, payload_format

__all__ = ["Style", "render", "size", "summary"]

Style = Literal["pretty", "compact", "raw"]

_WIDTH = 100  # pretty: a container whose compact form fits stays on one line
_LONG_TEXT = 200  # pretty: longer strings are replaced by their size
_LONG_LIST = 50  # pretty: longer arrays show their first items and a count
_SHOWN_ITEMS = 10
_SHORT = 60  # summary: the longest value shown as is
_SUMMARY_KEYS = 8
_MAX_DEPTH = 64  # deeper JSON is shown as its text: printing it as a tree would recurse too far
# C0 and C1 controls except tab, line feed and carriage return
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BREAKS = re.compile(r"[\t\n\r]")
_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_JSON = ("json_object", "json_array")  # shown as JSON when they decode
_MSGPACK = ("msgpack_map", "msgpack_array")  # summarised by their items


def size(n: int) -> str:
    """Bytes in the units people read: 512 B, 19.9 KB, 20.0 MB."""
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} KB"
    return f"{n / 1_000_000:.1f} MB"


def render(payload: bytes, style: Style) -> str:
    """The payload as text for one `watch` entry (several lines only for pretty or raw)."""
    if not payload:
        return "<empty>"
    text = _text(payload)
    if text is None:
        return summary(payload)
    if style == "raw":
        return text
    value = _json(text) if payload_format(payload) in _JSON else _NOT_JSON
    if value is _NOT_JSON:
        return text if style == "pretty" else _BREAKS.sub(_escape, text)
    if style == "pretty":
        return _pretty(_shorten(value), 0)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def summary(payload: bytes) -> str:
    """One line for a binary payload: a MessagePack map's keys and value sizes, or a hex peek."""
    value = None
    if payload_format(payload) in _MSGPACK:
        try:
            value = msgspec.msgpack.decode(payload)
        # a bad str: UnicodeDecodeError; an unhashable map key (an Ext, a map): TypeError
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError):
            value = None
    if isinstance(value, dict):
        items = [f"{_plain(k)}={_brief(v)}" for k, v in list(value.items())[:_SUMMARY_KEYS]]
        if len(value) > _SUMMARY_KEYS:
            items.append(f"… {len(value) - _SUMMARY_KEYS} more")
        return f"<msgpack {size(len(payload))}: {', '.join(items)}>"
    if isinstance(value, list):
        return f"<msgpack {size(len(payload))}: [{len(value)} items]>"
    peek = payload[:16].hex(" ")
    return f"<binary {size(len(payload))}: {peek}{' …' if len(payload) > 16 else ''}>"


_NOT_JSON: Any = object()


def _text(payload: bytes) -> str | None:
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(text) else text


def _json(text: str) -> Any:
    """An object or array decoded; `online`, `42` and the like are shown as the text they are."""
    if json_problem(text.encode(), max_depth=_MAX_DEPTH) is not None:
        return _NOT_JSON  # too deep to print as a tree: shown as its text
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return _NOT_JSON


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _LONG_TEXT:
        return f"<{size(len(value.encode()))} text>"
    if isinstance(value, list):
        items = [_shorten(v) for v in value[: _SHOWN_ITEMS if len(value) > _LONG_LIST else None]]
        if len(value) > _LONG_LIST:
            items.append(f"<… {len(value) - _SHOWN_ITEMS} more items>")
        return items
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    return value


def _pretty(value: Any, indent: int) -> str:
    flat = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if len(flat) + indent <= _WIDTH or not value or not isinstance(value, dict | list):
        return flat
    inner = " " * (indent + 2)
    if isinstance(value, dict):
        lines = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {_pretty(v, indent + 2)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(lines) + "\n" + " " * indent + "}"
    lines = [f"{inner}{_pretty(v, indent + 2)}" for v in value]
    return "[\n" + ",\n".join(lines) + "\n" + " " * indent + "]"


def _plain(value: Any) -> str:
    """A short, control-free rendering of a scalar (map keys, short strings)."""
    text = value if isinstance(value, str) else repr(value)
    text = _CONTROL.sub("?", _BREAKS.sub(_escape, text))
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"


def _brief(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return size(len(value))
    if isinstance(value, str):
        return _plain(value)
    if isinstance(value, dict | list):
        try:
            flat = msgspec.json.encode(value, enc_hook=_enc_hook).decode()
        except (TypeError, msgspec.EncodeError, RecursionError):
            flat = ""
        if flat and len(flat) <= _SHORT and not _CONTROL.search(flat):
            return flat
        return f"{{{len(value)} keys}}" if isinstance(value, dict) else f"[{len(value)} items]"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return _plain(value)


def _enc_hook(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return size(len(value))
    raise TypeError(type(value).__name__)  # an Ext or the like: the caller summarises instead
