"""Hypothesis strategies for hostile command payloads (issue 15).

Deep nesting (JSON and MessagePack, closed or not, alone or inside a field), invalid UTF-8
inside strings the schema keeps or ignores, and lists and strings far over the bounds.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import strategies as st

__all__ = ["deep_values", "envelopes", "hostile_payloads", "nested_value", "user_properties"]

_BASE: dict[str, Any] = {"nn_config": {"type": "Generic"}, "model": b"x"}
_FIELDS = ["request_id", "model_name", "labels", "nn_config", "expires_at", "unknown"]
_MARK = "\x01MARK\x01"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


invalid_utf8 = st.binary(min_size=1, max_size=6).filter(lambda b: not _is_utf8(b))

# strings that look like structure to a naive scanner
tricky_text = st.text(alphabet='[]{}"\\/ub\n\x01', max_size=12)


@st.composite
def nested_value(draw: st.DrawFn, max_depth: int = 48) -> tuple[Any, int]:
    """A JSON-like value nested `depth` levels, with shallow siblings; and that depth."""
    depth = draw(st.integers(0, max_depth))
    scalars = st.none() | st.integers(-(2**63), 2**63 - 1) | tricky_text
    value: Any = draw(scalars)
    for _ in range(depth):
        siblings: list[Any] = draw(st.lists(scalars | st.just([]), max_size=2))
        value = [*siblings, value] if draw(st.booleans()) else {"s": siblings, "k": value}
    return value, depth


deep_values = nested_value()


def _nesting(depth: int, kind: str, closed: bool) -> bytes:
    match kind:
        case "json-array":
            return b"[" * depth + (b"]" * depth if closed else b"")
        case "json-object":
            return b'{"a":' * depth + (b"1" + b"}" * depth if closed else b"")
        case "msgpack-array":
            return b"\x91" * depth + b"\xc0"
        case _:
            return b"\x81\xa1a" * depth + b"\xc0"


@st.composite
def _deep(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json-array", "json-object", "msgpack-array", "msgpack-map"]))
    depth = draw(st.integers(33, 3000) | st.sampled_from([33, 1000, 2000]))
    closed = draw(st.booleans())
    field = draw(st.sampled_from(_FIELDS)).encode()
    inner = _nesting(depth, kind, closed)
    if kind.startswith("json"):
        where = draw(st.sampled_from(["top", "field", "nn_config string"]))
        if where == "top" and kind == "json-object":
            return inner
        if where == "nn_config string":
            text = inner.replace(b'"', b'\\"')
            return b'{"nn_config": "' + text + b'", "model": "eA=="}'
        return b'{"' + field + b'": ' + inner + (b', "model": "eA=="}' if closed else b"")
    if draw(st.booleans()):
        return inner if kind == "msgpack-map" else b"\x81\xa1a" + inner
    # a map of the base fields plus one more whose value is the nesting
    base = msgspec.msgpack.encode(_BASE)
    return bytes([base[0] + 1]) + base[1:] + msgspec.msgpack.encode(field.decode()) + inner


@st.composite
def _bad_utf8(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from(_FIELDS))
    value: Any = [_MARK] if field == "labels" else _MARK
    body = {**_BASE, field: value}
    if draw(st.booleans()):
        body["model"] = "eA=="
        raw = msgspec.json.encode(body)
        mark = msgspec.json.encode(_MARK)[1:-1]
    else:
        raw = msgspec.msgpack.encode(body)
        mark = _MARK.encode()
    bad = draw(invalid_utf8)
    if raw[:1] != b"{":  # msgpack: keep the str header's length right (ASCII keeps it bad)
        bad = bad + b"a" * (len(mark) - len(bad))
    return raw.replace(mark, bad)


@st.composite
def _oversized(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1001, 20_000))
    body: dict[str, Any] = {**_BASE}
    match draw(st.sampled_from(["labels", "long labels", "model_name", "anchors", "masks"])):
        case "labels":
            body["labels"] = ["l"] * n
        case "long labels":
            body["labels"] = ["x" * 256] * (n % 1000 + 257)
        case "model_name":
            body["model_name"] = "n" * (n * 10)
        case "anchors":
            body["nn_config"] = {
                "type": "YOLO",
                "nn_config": {"num_classes": 1, "anchors": [1] * n},
            }
        case _:
            masks = {f"side{i}": [0] for i in range(n // 100 + 65)}
            body["nn_config"] = {
                "type": "YOLO",
                "nn_config": {"num_classes": 1, "anchor_masks": masks},
            }
    if draw(st.booleans()):
        return msgspec.json.encode(body)
    return msgspec.msgpack.encode(body)


hostile_payloads = st.one_of(_deep(), _bad_utf8(), _oversized())


# --- signed commands: what a sender controls besides the payload -------------------------

# what mosquitto forwards in a string (it refuses control characters and noncharacters),
# with U+FEFF, which paho refused (agent/paho_fast.py)
_property_text = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Cn")) | st.just("\ufeff"), max_size=40
)
_names = st.sampled_from(["oak-key-id", "oak-signature", "oak-key", "x"]) | _property_text
_values = (
    _property_text
    | st.sampled_from(["ops", "A" * 88, "A" * 86 + "==", "=" * 88])
    | st.integers(0, 30_000).map(lambda n: "A" * n)  # huge values
)
user_properties = st.lists(st.tuples(_names, _values), max_size=6)

_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _envelope(draw: st.DrawFn) -> bytes:
    """A MessagePack map shaped like, or almost like, a signed-command envelope."""
    keys = ["signed", "key_id", "signature"]
    body: dict[str, Any] = {
        "signed": draw(st.binary(max_size=200) | _msgpack_values),
        "key_id": draw(st.sampled_from(["ops", "cam1", "nobody"]) | _msgpack_values),
        "signature": draw(st.binary(min_size=64, max_size=64) | _msgpack_values),
    }
    if draw(st.booleans()):
        del body[draw(st.sampled_from(keys))]
    if draw(st.booleans()):
        body[draw(st.sampled_from([*keys, "request_id", "nn_config"]))] = draw(_msgpack_values)
    return msgspec.msgpack.encode(body)


envelopes = _envelope()
