"""The deploy's `output` object, the config's `[output]` and the simulator's objects knob:
property tests of decoders of outside input."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, load_config
from agent.errors import InvalidPayload
from agent.messages import (
    ObjectSchedule,
    OutputOptions,
    SimObject,
    decode_deploy,
    decode_objects,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

_T = TypeVar("_T")


def _attempt(decode: Callable[[bytes], _T], payload: bytes) -> _T | InvalidPayload:
    """What the decoder returned, or the one error type it may raise."""
    try:
        return decode(payload)
    except InvalidPayload as exc:
        return exc


_GENERIC: dict[str, Any] = {"nn_config": {"type": "Generic"}, "model": b"x"}
_FIELDS = ("max_rate", "min_confidence", "counts_max_rate", "on_frames", "off_seconds")

numbers = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4)
    | st.lists(st.integers(), max_size=2)
)
outputs = st.dictionaries(st.sampled_from([*_FIELDS, "max-rate", "other"]), numbers, max_size=6)


def _valid(field: str, value: Any) -> bool:
    """The rule each field follows, written out independently of the Struct's Meta."""
    if isinstance(value, bool) or (field == "on_frames" and not isinstance(value, int)):
        return False
    if value is None:
        return field in ("max_rate", "min_confidence")
    if not isinstance(value, int | float) or math.isnan(value) or math.isinf(value):
        return False
    match field:
        case "max_rate":
            return 0 <= value <= 10_000
        case "min_confidence":
            return 0 <= value <= 1
        case "counts_max_rate":
            return 0 < value <= 10_000
        case "on_frames":
            return 1 <= value <= 10_000
        case "off_seconds":
            return 0 < value <= 86_400
    return False  # an unknown key


@given(outputs, st.sampled_from(["json", "msgpack"]))
@example({"max_rate": math.inf}, "json")  # null on the wire: no limit, valid
@example({"max_rate": math.inf}, "msgpack")  # inf on the wire: out of range
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_output_decodes_exactly_when_every_field_is_valid(
    output: dict[str, Any], encoding: str
) -> None:
    body = {**_GENERIC, "output": output}
    encode = msgspec.msgpack.encode if encoding == "msgpack" else msgspec.json.encode
    try:
        payload = encode(body)
    except (TypeError, OverflowError, msgspec.EncodeError):
        assume(False)
        return
    # judged on what goes on the wire: JSON has no inf or nan, msgspec writes them as null
    decode = msgspec.msgpack.decode if encoding == "msgpack" else msgspec.json.decode
    output = decode(payload)["output"]
    valid = all(_valid(field, value) for field, value in output.items())
    command = _attempt(decode_deploy, payload)
    if isinstance(command, InvalidPayload):
        assert not valid, command
        # the error names the field: `$.output` (an unknown key) or `$.output.<field>`
        assert command.path is not None
        assert command.path.startswith("$.output"), command.path
        return
    assert valid
    assert command.output is not None
    defaults = OutputOptions(max_rate=7.0, min_confidence=0.2, on_frames=4)
    resolved = command.output.over(defaults)
    for field in _FIELDS:
        expected = output[field] if field in output else getattr(defaults, field)
        assert getattr(resolved, field) == expected


@pytest.mark.parametrize(
    ("output", "path", "reason"),
    [
        ({"max_rate": -1}, "$.output.max_rate", ">= 0.0"),
        ({"min_confidence": 1.5}, "$.output.min_confidence", "<= 1.0"),
        ({"counts_max_rate": 0}, "$.output.counts_max_rate", "> 0.0"),
        ({"on_frames": 0}, "$.output.on_frames", ">= 1"),
        ({"off_seconds": 0}, "$.output.off_seconds", "> 0.0"),
        ({"maxrate": 5}, "$.output", "unknown field `maxrate`"),
        ("fast", "$.output", "Expected `object | null`, got `str`"),
    ],
)
def test_bad_output_names_the_field(output: Any, path: str, reason: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        decode_deploy(msgspec.json.encode({**_GENERIC, "output": output}))
    assert caught.value.path == path
    assert reason in caught.value.message


def test_no_output_means_the_agents_default_and_null_fields_mean_no_limit() -> None:
    assert decode_deploy(msgspec.json.encode(_GENERIC)).output is None
    command = decode_deploy(
        msgspec.json.encode({**_GENERIC, "output": {"max_rate": None, "min_confidence": None}})
    )
    assert command.output is not None
    resolved = command.output.over(OutputOptions(max_rate=3.0, min_confidence=0.5))
    assert (resolved.max_rate, resolved.min_confidence) == (None, None)


def test_config_output_section_sets_the_default(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[output]\nmax_rate = 5\nmin_confidence = 0.6\non_frames = 3\n")
    config = load_config(path)
    assert config.output == OutputOptions(max_rate=5.0, min_confidence=0.6, on_frames=3)
    path.write_text("[output]\nmax_rat = 5\n")
    with pytest.raises(ConfigError, match=r"unknown field `max_rat` - at `\$.output`"):
        load_config(path)
    path.write_text("[output]\ncounts_max_rate = 0\n")
    with pytest.raises(ConfigError, match=r"\$.output.counts_max_rate"):
        load_config(path)


# --- the simulator's objects knob -------------------------------------------------------------


@given(st.binary(max_size=256))
@settings(max_examples=300)
def test_objects_knob_arbitrary_bytes_raise_only_invalid_payload(payload: bytes) -> None:
    result = _attempt(decode_objects, payload)
    if isinstance(result, InvalidPayload):
        assert result.path is not None
        assert result.path.startswith("$")
    else:
        assert result is None or isinstance(result, ObjectSchedule)


frame_items = st.integers(-2, 5) | st.fixed_dictionaries(
    {"label": st.integers(-2, 5)}, optional={"confidence": st.floats(-0.5, 1.5)}
)


@given(
    st.fixed_dictionaries(
        {"frames": st.lists(st.lists(frame_items, max_size=3), max_size=4)},
        optional={"loop": st.booleans()},
    )
)
@settings(max_examples=300)
def test_objects_knob_decodes_exactly_the_valid_schedules(body: dict[str, Any]) -> None:
    def ok(item: Any) -> bool:
        if isinstance(item, int):
            return item >= 0
        return bool(item["label"] >= 0 and 0 <= item.get("confidence", 0.9) <= 1)

    valid = bool(body["frames"]) and all(ok(i) for frame in body["frames"] for i in frame)
    schedule = _attempt(decode_objects, msgspec.json.encode(body))
    if isinstance(schedule, InvalidPayload):
        assert not valid
        assert schedule.path is not None
        assert schedule.path.startswith("$.frames"), schedule.path
        return
    assert valid
    assert isinstance(schedule, ObjectSchedule)
    assert schedule.loop == body.get("loop", True)
    for frame, decoded in zip(body["frames"], schedule.frames, strict=True):
        labels = [i if isinstance(i, int) else i["label"] for i in frame]
        got = [i.label if isinstance(i, SimObject) else i for i in decoded]
        assert got == labels


def test_objects_knob_empty_resets() -> None:
    assert decode_objects(b"") is None
    assert decode_objects(b"  ") is None
