"""Cheap byte-level checks that run before a decoder sees untrusted bytes.

msgspec recurses once per nesting level and has no depth option of its own: a few kilobytes
of `[` exhaust Python's recursion limit and raise RecursionError from inside the decoder.
These checks bound the nesting (and, for MessagePack, the number of items) first, in time
linear in the payload: JSON with bytes.translate and numpy in 1 MiB chunks, MessagePack by
walking the item headers (never the bin and str contents). Each returns why the bytes are
refused, or None; a malformed payload that nests shallowly passes, for the decoder to report.
`payload_format` is the one place that tells JSON from MessagePack by the first byte.
"""

from __future__ import annotations

import struct
from typing import Final, Literal

import numpy as np

__all__ = [
    "MAX_DEPTH",
    "MAX_MSGPACK_ITEMS",
    "PayloadFormat",
    "json_problem",
    "msgpack_problem",
    "payload_format",
    "utf8_problem",
]

PayloadFormat = Literal["json_object", "json_array", "msgpack_map", "msgpack_array"]

MAX_DEPTH: Final = 32
"""Deepest nesting of arrays and objects accepted; the schema itself needs 5."""

MAX_MSGPACK_ITEMS: Final = 100_000
"""Most MessagePack items (keys, values, elements) in one payload; the schema needs < 10,000."""

_OPENERS: Final = b"[{"
# structure is quotes and brackets; escapes are a backslash and the character after it
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'"[]{}')
_NOT_ESCAPE: Final = bytes(b for b in range(256) if b not in b'"[]{}\\/bfnrtu')
_STEP: Final = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_QUOTE: Final = ord('"')
_CHUNK: Final = 1 << 20


def payload_format(payload: bytes) -> PayloadFormat | None:
    """What a payload opens with: a JSON object or array (after whitespace), a MessagePack
    map or array header; None for anything else (a scalar, text, empty)."""
    opener = payload.lstrip()[:1]
    if opener == b"{":
        return "json_object"
    if opener == b"[":
        return "json_array"
    first = payload[0] if payload else -1
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return "msgpack_map"
    if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        return "msgpack_array"
    return None


def _too_deep(max_depth: int) -> str:
    return f"nesting is deeper than {max_depth} levels"


def _skeleton(payload: bytes) -> bytes:
    """The quotes and brackets of a JSON document, without those escaped inside strings."""
    if b"\\" in payload:
        # keep every character that may follow a backslash, so that each escape stays in
        # one piece, then drop the escapes that could be taken for structure
        payload = payload.translate(None, _NOT_ESCAPE)
        payload = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    return payload.translate(None, _NOT_STRUCTURE)


def _deeper_than(skeleton: bytes, max_depth: int) -> bool:
    """Whether the brackets outside strings open more than `max_depth` levels at some point."""
    depth = 0
    inside = np.uint8(0)  # inside a string at the start of the chunk
    for start in range(0, len(skeleton), _CHUNK):
        chunk = np.frombuffer(skeleton, dtype=np.uint8, offset=start)[:_CHUNK]
        steps = np.take(_STEP, chunk)
        if inside or skeleton.find(b'"', start, start + _CHUNK) >= 0:
            in_string = np.bitwise_xor.accumulate((chunk == _QUOTE).view(np.uint8)) ^ inside
            steps = np.where(in_string, np.int8(0), steps)
            inside = in_string[-1]
        levels = np.cumsum(steps, dtype=np.int32)
        levels += depth
        if levels.min() < 0:  # an unmatched closer: the decoder stops there, at the latest
            below = np.flatnonzero(levels < 0)[0]
            return bool(levels[:below].max(initial=0) > max_depth)
        if levels.max() > max_depth:
            return True
        depth = int(levels[-1])
    return False


def json_problem(payload: bytes, *, max_depth: int = MAX_DEPTH) -> str | None:
    """Why a JSON document is refused before decoding (nesting too deep), or None."""
    skeleton = _skeleton(payload)
    if sum(skeleton.count(c) for c in _OPENERS) <= max_depth:
        return None  # the usual case: too few brackets, even counting those inside strings
    return _too_deep(max_depth) if _deeper_than(skeleton, max_depth) else None


# MessagePack first bytes: (bytes of length field, extra fixed bytes) for the sized types
_SIZED: Final = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext (+ type byte)
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str
}  # fmt: skip
_FIXED: Final = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # ints
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext (+ type byte)
}  # fmt: skip
_CONTAINERS: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_UINT: Final = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}
_STR_TYPES: Final = frozenset({0xD9, 0xDA, 0xDB})


def _walk(
    payload: bytes, max_depth: int, max_items: int, check_utf8: bool
) -> tuple[str | None, int | None]:
    """Walk the item headers: (why refused, offset of the first non-UTF-8 str if asked)."""
    size = len(payload)
    pos = 0
    items = 0
    pending = [1]  # items still to read in each open container; the root holds one value
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= size:
            return None, None  # truncated: the decoder reports it
        items += 1
        if items > max_items:
            return f"more than {max_items} MessagePack items", None
        first = payload[pos]
        pos += 1
        count = 0
        text = 0
        if first <= 0x7F or first >= 0xE0:
            continue  # fixint
        if first <= 0x8F:
            count = 2 * (first & 0x0F)
        elif first <= 0x9F:
            count = first & 0x0F
        elif first <= 0xBF:
            text = first & 0x1F
            if check_utf8 and not _is_utf8(payload, pos, text):
                return None, pos
            pos += text
            continue
        elif first in _FIXED:
            pos += _FIXED[first]
            continue
        elif first in _SIZED:
            width, extra = _SIZED[first]
            if pos + width > size:
                return None, None
            (length,) = _UINT[width].unpack_from(payload, pos)
            pos += width + extra
            if check_utf8 and first in _STR_TYPES and not _is_utf8(payload, pos, length):
                return None, pos
            pos += length
            continue
        elif first in _CONTAINERS:
            width, per = _CONTAINERS[first]
            if pos + width > size:
                return None, None
            (length,) = _UINT[width].unpack_from(payload, pos)
            pos += width
            count = per * length
        else:
            return None, None  # 0xC1, never used: the decoder reports it
        if len(pending) > max_depth:  # this container opens level len(pending)
            return _too_deep(max_depth), None
        pending.append(count)
    return None, None


def _is_utf8(payload: bytes, start: int, length: int) -> bool:
    try:
        payload[start : start + length].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def msgpack_problem(
    payload: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_MSGPACK_ITEMS
) -> str | None:
    """Why a MessagePack document is refused before decoding (too deep, too many items)."""
    return _walk(payload, max_depth, max_items, check_utf8=False)[0]


def utf8_problem(payload: bytes, *, msgpack: bool) -> str:
    """Where a payload's strings stop being UTF-8 (called once a decoder said so)."""
    if msgpack:
        offset = _walk(payload, MAX_DEPTH, MAX_MSGPACK_ITEMS, check_utf8=True)[1]
    else:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            offset = exc.start
        else:
            offset = None
    where = f" (the string at byte {offset})" if msgpack else f" (byte {offset})"
    return "a string is not valid UTF-8" + (where if offset is not None else "")
