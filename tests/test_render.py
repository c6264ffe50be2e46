"""How `oak-agent watch` shows payloads: any bytes in, readable text out, never raw bytes."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.render import Style, render, size, summary
from tests.strategies import hostile_payloads

STYLES: tuple[Style, ...] = ("pretty", "compact", "raw")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=60) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=25,
)


@given(st.binary(max_size=2000) | hostile_payloads, st.sampled_from(STYLES))
# a MessagePack map keyed by an Ext: msgspec raises TypeError (found by this test in CI)
@example(b"\xde\x00\x02\x00\x00\xd4\x00\x00\x00", "pretty")
def test_any_bytes_render_without_control_bytes(payload: bytes, style: Style) -> None:
    shown = render(payload, style)
    assert not CONTROL.search(shown)
    if style == "compact":
        assert "\n" not in shown
        assert "\r" not in shown


@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_compact_json_is_the_same_value_on_one_line(value: dict[str, Any]) -> None:
    shown = render(json.dumps(value, indent=2).encode(), "compact")
    assert "\n" not in shown
    assert json.loads(shown) == value


@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_pretty_json_is_valid_json(value: dict[str, Any]) -> None:
    assert isinstance(json.loads(render(json.dumps(value).encode(), "pretty")), dict)


@given(
    st.dictionaries(
        st.text(max_size=70),
        st.binary(max_size=3000) | st.text(max_size=100) | json_values,
        max_size=12,
    )
)
def test_msgpack_maps_are_one_line(value: dict[str, Any]) -> None:
    payload = msgspec.msgpack.encode(value)
    shown = summary(payload)
    assert shown.startswith(f"<msgpack {size(len(payload))}: ")
    assert "\n" not in shown
    assert not CONTROL.search(shown)


def test_a_deploy_command_with_a_blob() -> None:
    body = {
        "request_id": "cli-1",
        "nn_config": {"type": "MobileNet"},
        "model": bytes(19904),
        "model_name": "ssd_tiny.blob",
    }
    payload = msgspec.msgpack.encode(body)
    expected = (
        f'<msgpack {size(len(payload))}: request_id=cli-1, nn_config={{"type":"MobileNet"}}, '
        "model=19.9 KB, model_name=ssd_tiny.blob>"
    )
    for style in STYLES:
        assert render(payload, style) == expected


@pytest.mark.parametrize("style", STYLES)
def test_text_is_shown_as_text(style: Style) -> None:
    assert render(b"online", style) == "online"
    assert render(b"", style) == "<empty>"


def test_pretty_keeps_short_containers_on_one_line_and_shortens_long_values() -> None:
    status = {
        "state": "running",
        "model": {"sha256": "ab" * 32, "size": 19904},
        "labels": list(range(80)),
        "blob": "A" * 30000,
    }
    shown = render(json.dumps(status).encode(), "pretty")
    assert shown.splitlines() == [
        "{",
        '  "state": "running",',
        f'  "model": {{"sha256": "{"ab" * 32}", "size": 19904}},',
        '  "labels": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "<… 70 more items>"],',
        '  "blob": "<30.0 KB text>"',
        "}",
    ]
    # compact and raw show everything
    assert json.loads(render(json.dumps(status).encode(), "compact")) == status
    assert render(json.dumps(status).encode(), "raw") == json.dumps(status)


def test_binary_that_is_not_msgpack_is_a_hex_peek() -> None:
    assert summary(b"\xc1\x00\xff") == "<binary 3 B: c1 00 ff>"
    assert summary(bytes(range(20))).endswith("0e 0f …>")


@pytest.mark.parametrize(
    ("n", "shown"), [(0, "0 B"), (999, "999 B"), (19904, "19.9 KB"), (20_000_000, "20.0 MB")]
)
def test_sizes(n: int, shown: str) -> None:
    assert size(n) == shown
