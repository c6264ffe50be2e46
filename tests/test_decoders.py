"""Property tests for everything that decodes outside input: commands, topics, config."""

from __future__ import annotations

import contextlib
import string
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.config import Config, ConfigError, load_config
from agent.errors import InvalidPayload
from agent.messages import (
    DeleteCommand,
    DeployCommand,
    Event,
    YoloConfig,
    decode_delete,
    decode_deploy,
)
from agent.topics import CommandTopic, SimulatorTopic, Topics

if TYPE_CHECKING:
    from collections.abc import Callable

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
nn_configs = st.fixed_dictionaries(
    {"type": st.sampled_from(["Generic", "YOLO", "MobileNet", "SSD", ""])},
    optional={
        "num_inference_threads": st.integers(-3, 5),
        "nn_config": st.dictionaries(
            st.sampled_from(
                [
                    "num_classes",
                    "coordinate_size",
                    "anchors",
                    "anchor_masks",
                    "iou_threshold",
                    "confidence_threshold",
                    "other",
                ]
            ),
            json_values,
            max_size=4,
        ),
    },
)
deploy_bodies = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.text(max_size=140) | json_values,
        "nn_config": nn_configs | json_values,
        "model": st.binary(max_size=64) | json_values,
        "model_sha256": st.text(alphabet="0123456789abcdefABCDEFx", min_size=60, max_size=66),
        "labels": st.lists(st.text(max_size=5), max_size=3) | json_values,
        "expires_at": st.floats(allow_nan=False) | json_values,
    },
)


def _decodes_or_invalid(decode: Callable[[bytes], object], payload: bytes) -> object | None:
    try:
        return decode(payload)
    except InvalidPayload as exc:
        error = exc
    assert error.path is not None
    assert error.path.startswith("$")
    return None


@given(st.binary(max_size=512))
@settings(max_examples=500)
def test_arbitrary_bytes_raise_only_invalid_payload(payload: bytes) -> None:
    _decodes_or_invalid(decode_deploy, payload)
    _decodes_or_invalid(decode_delete, payload)


@given(deploy_bodies, st.sampled_from(["json", "msgpack"]))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_structured_deploys_decode_or_name_the_field(body: dict[str, Any], encoding: str) -> None:
    encode = msgspec.msgpack.encode if encoding == "msgpack" else msgspec.json.encode
    try:
        payload = encode(body)
    except (TypeError, OverflowError, msgspec.EncodeError):
        assume(False)
        return
    command = _decodes_or_invalid(decode_deploy, payload)
    if command is not None:
        assert isinstance(command, DeployCommand)
        assert not isinstance(command.nn_config, str)
        assert command.model is not None or command.model_sha256 is not None


@given(
    st.integers(1, 1000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.lists(st.floats(0, 1000, allow_nan=False), max_size=12),
    st.booleans(),
)
def test_valid_yolo_round_trips(
    classes: int, iou: float, confidence: float, anchors: list[float], as_string: bool
) -> None:
    nn_config = {
        "type": "YOLO",
        "nn_config": {
            "num_classes": classes,
            "iou_threshold": iou,
            "confidence_threshold": confidence,
            "anchors": anchors,
            "anchor_masks": {"side13": [0, 1, 2]},
        },
    }
    given_config = msgspec.json.encode(nn_config).decode() if as_string else nn_config
    for encode in (msgspec.json.encode, msgspec.msgpack.encode):
        command = decode_deploy(encode({"nn_config": given_config, "model": b"blob"}))
        assert isinstance(command.nn_config, YoloConfig)
        assert command.nn_config.nn_config.num_classes == classes
        assert command.nn_config.nn_config.anchors == tuple(anchors)
        assert command.model == b"blob"


def test_delete_payloads() -> None:
    assert decode_delete(b"") == DeleteCommand()
    assert decode_delete(b"  \n") == DeleteCommand()
    assert decode_delete(b'{"request_id": "x-1"}') == DeleteCommand(request_id="x-1")
    assert decode_delete(msgspec.msgpack.encode({"request_id": "y"})).request_id == "y"
    with pytest.raises(InvalidPayload, match=r"at `\$.request_id`"):
        decode_delete(b'{"request_id": ""}')


def test_event_encodes_error_only_on_failure() -> None:
    event = Event(
        request_id="r", action="deploy", camera="C", stream="CAM_A", state="accepted", ts=1.0
    )
    assert b"error" not in msgspec.json.encode(event)


segment = st.text(alphabet=string.ascii_letters + string.digits + "_-+#/", max_size=20)


@given(segment, segment, st.sampled_from(["deploy", "delete", "status", "unplug", ""]))
def test_topic_parsing_is_total(camera: str, stream: str, last: str) -> None:
    topics = Topics.for_agent("oak", "agent-1")
    parsed = topics.parse(f"{topics.base}/cameras/{camera}/streams/{stream}/nn/{last}")
    if parsed is not None:
        assert isinstance(parsed, CommandTopic)
        assert parsed.action == last
        assert topics.command(parsed.camera, parsed.stream, parsed.action) == (
            f"{topics.base}/cameras/{camera}/streams/{stream}/nn/{last}"
        )
    knob = topics.parse(f"{topics.base}/simulator/cameras/{camera}/{last}")
    assert knob is None or isinstance(knob, SimulatorTopic)
    assert topics.parse(f"other/{camera}") is None


@given(st.binary(max_size=300))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
def test_config_decoder_raises_only_config_error(tmp_path_factory: Any, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "agent.toml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        assert isinstance(load_config(path), Config)


def test_config_unknown_key_is_named(tmp_path: Any) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[mqtt]\nhots = "x"\n')
    with pytest.raises(ConfigError, match="unknown field `hots`"):
        load_config(path)
    path.write_text('[[simulator.cameras]]\nmxid = "abc"\n')
    with pytest.raises(ConfigError, match=r"simulator.cameras\[0\].mxid"):
        load_config(path)
