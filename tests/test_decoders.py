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
from agent.limits import MAX_DEPTH, json_problem, msgpack_problem, payload_format
from agent.messages import (
    DeleteCommand,
    Deploy,
    Event,
    Info,
    LinkCounters,
    ModelByHash,
    ModelUpload,
    YoloConfig,
    decode_delete,
    decode_deploy,
    salvage_request_id,
)
from agent.state import StateDocument, StateFile
from agent.topics import CommandTopic, SimulatorTopic, StatsRequest, Topics
from tests.strategies import deep_values, hostile_payloads

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


_GENERIC: dict[str, Any] = {"nn_config": {"type": "Generic"}, "model": "eA=="}


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
        assert isinstance(command, Deploy)
        assert not isinstance(command.nn_config, str)
        match command.model:
            case ModelUpload(data=data, sha256=sha256):
                assert data
                if isinstance(body["model"], bytes):
                    assert data == body["model"]
                assert sha256 == (body["model_sha256"].lower() if "model_sha256" in body else None)
            case ModelByHash(sha256=sha256):
                assert "model" not in body or body["model"] is None
                assert sha256 == body["model_sha256"].lower()


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
        assert command.model == ModelUpload(b"blob")


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


@given(
    segment,
    segment,
    st.sampled_from(["deploy", "delete", "status", "unplug", "objects", "request", "counts", ""]),
)
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
    if isinstance(knob, SimulatorTopic):
        assert topics.simulator(knob.camera, knob.fault) == (
            f"{topics.base}/simulator/cameras/{camera}/{last}"
        )
    # only `{base}/stats/request` asks for the stats; the retained stats topics are outputs
    stats = topics.parse(f"{topics.base}/stats/{last}")
    assert isinstance(stats, StatsRequest) == (last == "request")
    assert topics.parse(topics.stats) is None
    assert topics.parse(topics.camera_stats(camera)) is None
    assert topics.parse(topics.counts(camera, stream)) is None
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


@pytest.mark.parametrize("mxid", ["abc", "", "A" * 65, "14442C10-D13"])
def test_config_refuses_a_bad_mxid_wherever_one_is_given(tmp_path: Any, mxid: str) -> None:
    # the Struct's pattern is the only check: MXID_RE, as the topics use it
    path = tmp_path / "agent.toml"
    path.write_text(f'[[simulator.cameras]]\nmxid = "{mxid}"\n')
    with pytest.raises(ConfigError, match=r"simulator.cameras\[0\].mxid"):
        load_config(path)
    path.write_text(f'[depthai]\nallow = ["{mxid}"]\n')
    with pytest.raises(ConfigError, match=r"depthai.allow\[0\]"):
        load_config(path)
    path.write_text(f'[depthai.names]\n"{mxid}" = "front"\n')
    with pytest.raises(ConfigError, match=r"depthai.names"):
        load_config(path)
    path.write_text('[depthai]\nallow = ["14442C10D13EABCE00"]\n')
    assert load_config(path).depthai is not None


# --- hostile input (issue 15) ------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(deep_values, st.sampled_from(["json", "msgpack"]))
@settings(max_examples=150)
def test_nesting_check_agrees_with_the_real_depth(drawn: tuple[Any, int], encoding: str) -> None:
    value, _ = drawn
    if encoding == "json":
        too_deep = json_problem(msgspec.json.encode(value)) is not None
    else:
        too_deep = msgpack_problem(msgspec.msgpack.encode(value)) is not None
    assert too_deep == (_depth(value) > MAX_DEPTH)


@given(st.binary(max_size=300), st.integers(1, 40))
@settings(max_examples=300)
def test_nesting_check_is_total_and_protects_the_decoder(raw: bytes, limit: int) -> None:
    # whatever passes the check decodes without recursion trouble at any depth limit
    for problem, decode in (
        (json_problem(raw, max_depth=limit), msgspec.json.decode),
        (msgpack_problem(raw, max_depth=limit, max_items=1000), msgspec.msgpack.decode),
    ):
        if problem is None:
            # untyped, a MessagePack map keyed by a map is a TypeError (unhashable key)
            with contextlib.suppress(msgspec.MsgspecError, UnicodeDecodeError, TypeError):
                decoded = decode(raw)
                assert _depth(decoded) <= limit


@given(hostile_payloads)
@settings(
    max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
def test_hostile_payloads_raise_only_invalid_payload(payload: bytes) -> None:
    _decodes_or_invalid(decode_deploy, payload)
    _decodes_or_invalid(decode_delete, payload)
    found = salvage_request_id(payload)
    assert found is None or 0 < len(found) <= 128


@given(st.binary(max_size=400) | hostile_payloads)
@settings(
    max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
def test_salvage_never_raises(payload: bytes) -> None:
    found = salvage_request_id(payload)
    assert found is None or isinstance(found, str)


def test_non_finite_expires_at_is_refused() -> None:
    for value in (float("nan"), float("inf"), float("-inf"), -1.0, 1e12):
        for decode in (decode_deploy, decode_delete):
            body = {"nn_config": {"type": "Generic"}, "model": b"x", "expires_at": value}
            with pytest.raises(InvalidPayload, match=r"at `\$.expires_at`"):
                decode(msgspec.msgpack.encode(body))
    assert decode_delete(b'{"expires_at": 1795736466.5}').expires_at == 1795736466.5


def test_label_bounds() -> None:
    def deploy(labels: list[str]) -> Deploy:
        return decode_deploy(msgspec.json.encode({**_GENERIC, "labels": labels}))

    assert deploy(["x" * 256] * 256).labels == ("x" * 256,) * 256  # exactly 64 KiB
    with pytest.raises(InvalidPayload, match=r"65537 bytes in total.*at `\$.labels`"):
        deploy(["x" * 256] * 256 + ["y"])
    with pytest.raises(InvalidPayload, match=r"length <= 1000 - at `\$.labels`"):
        deploy(["l"] * 1001)
    with pytest.raises(InvalidPayload, match=r"at `\$.labels\[3\]`"):
        deploy(["a", "b", "c", "x" * 257])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"request_id": "\xff"}', "not valid UTF-8 (byte 16)"),
        (b"\x81\xaarequest_id\xa1\xff", "not valid UTF-8 (the string at byte 13)"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, "deeper than 32 levels"),
        (b"\x81\xa1a" * 33 + b"\xc0", "deeper than 32 levels"),
        (
            b"\x81\xa1a\xdd\x00\x01\x86\xa1" + b"\xc0" * 100_001,
            "more than 100000 MessagePack items",
        ),
    ],
)
def test_hostile_payload_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        decode_delete(payload)
    assert reason in caught.value.message
    assert caught.value.path == "$"


def test_nesting_check_is_linear_on_pathological_strings() -> None:
    # each quote opens an unterminated string: a naive retry at every quote is quadratic
    payload = b'{"a": [' * 40 + b'"' + b'\\"' * 2_000_000
    assert json_problem(payload) is not None


@given(
    st.binary(max_size=300)
    | hostile_payloads
    | deep_values.map(lambda d: msgspec.json.encode(d[0]))
)
@settings(
    max_examples=200,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
def test_state_file_loads_or_is_kept_aside(tmp_path_factory: Any, raw: bytes) -> None:
    folder = tmp_path_factory.mktemp("state")
    (folder / "state.json").write_bytes(raw)
    document, problem = StateFile(folder).load()
    assert isinstance(document, StateDocument)
    if problem is not None:
        assert "kept as state.json.unreadable-" in problem
        assert len(problem) < 1000
        assert not (folder / "state.json").exists()


_previous_values = st.dictionaries(st.text(max_size=8), st.text(max_size=70), max_size=3)


@given(
    previous=_previous_values | json_values,
    group=st.none() | st.text(max_size=12) | json_values,
    omit=st.sets(st.sampled_from(["previous", "group"])),
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_state_file_with_previous_models_and_groups_loads_or_names_the_field(
    tmp_path_factory: Any, previous: Any, group: Any, omit: set[str]
) -> None:
    """The fields added later (`cameras.*.previous`, `in_flight[].group`): absent, they
    take their defaults; well typed, they load as written; else the file is kept aside
    and the reason names the field."""
    camera: dict[str, Any] = {"desired": {}, "last_good": {}, "previous": previous}
    request: dict[str, Any] = {
        "request_id": "r",
        "action": "deploy",
        "camera": "C",
        "stream": "CAM_A",
        "group": group,
    }
    for key in omit:
        (camera if key == "previous" else request).pop(key)
    raw = {"version": 1, "cameras": {"C": camera}, "in_flight": [request]}
    folder = tmp_path_factory.mktemp("state")
    (folder / "state.json").write_bytes(msgspec.json.encode(raw))
    document, problem = StateFile(folder).load()
    good_previous = isinstance(previous, dict) and all(
        isinstance(v, str) for v in previous.values()
    )
    good_group = group is None or isinstance(group, str)
    if (good_previous or "previous" in omit) and (good_group or "group" in omit):
        assert problem is None
        loaded = document.cameras["C"].previous
        assert loaded == ({} if "previous" in omit else previous)
        assert document.in_flight[0].group == (None if "group" in omit else group)
        assert document.models() == set(loaded.values())
    else:
        assert problem is not None
        assert document == StateDocument()
        assert "$.cameras[...].previous" in problem or "$.in_flight[0].group" in problem, problem


@given(st.binary(max_size=64) | hostile_payloads)
def test_payload_format_names_what_the_first_byte_opens(payload: bytes) -> None:
    kind = payload_format(payload)
    stripped = payload.lstrip()
    if kind in ("json_object", "json_array"):
        assert stripped[:1] == (b"{" if kind == "json_object" else b"[")
    elif kind is not None:
        value: object = None
        with contextlib.suppress(
            msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError
        ):
            value = msgspec.msgpack.decode(payload)
        # what decodes is of the kind named
        if value is not None:
            assert isinstance(value, dict if kind == "msgpack_map" else list)
    else:
        assert stripped[:1] not in (b"{", b"[")
        with contextlib.suppress(
            msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError
        ):
            assert not isinstance(msgspec.msgpack.decode(payload), dict | list)


def test_info_without_link_counters_decodes_with_zeros() -> None:
    """`link` is a new defaulted field: an `info` from an older agent still decodes."""
    old = {
        "agent_id": "a",
        "version": "0",
        "depthai_version": "2.33",
        "backend": "simulator",
        "cameras": [],
        "started_at": 1.0,
    }
    info = msgspec.json.decode(msgspec.json.encode(old), type=Info)
    assert info.link == LinkCounters()
    assert msgspec.json.decode(msgspec.json.encode(info))["link"]["connects"] == 0
