"""Property tests for group commands: the target decoder, group topics, target selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, load_config
from agent.errors import InvalidPayload
from agent.groups import select
from agent.messages import (
    Deploy,
    GroupTarget,
    ModelUpload,
    decode_group_delete,
    decode_group_deploy,
)
from agent.topics import STREAM_RE, GroupCommandTopic, Topics
from tests.strategies import hostile_payloads

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

_T = TypeVar("_T")

streams = st.sampled_from(["CAM_A", "CAM_H", "DEPTH_B_C", "CAM_Z", "cam_a", "", "DEPTH_B"])
camera_refs = st.one_of(
    st.just("*"),
    st.sampled_from(["14442C10D13EABCE00", "front-door", ""]),
    st.text(max_size=300),
)
targets = st.one_of(
    st.fixed_dictionaries(
        {"cameras": st.lists(camera_refs, max_size=5), "stream": streams},
        optional={"other": st.integers(-(2**63), 2**63 - 1)},
    ),
    st.dictionaries(st.sampled_from(["cameras", "stream", "camera"]), st.text(max_size=4)),
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.lists(st.text(max_size=4), max_size=3),
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "target": targets,
        "nn_config": st.sampled_from([{"type": "Generic"}, {"type": "Nope"}, "{}", 3]),
        "model": st.binary(max_size=8),
        "request_id": st.sampled_from(["g1", "", "bad id"]),
    },
)


def _encode(body: dict[str, Any], encoding: str) -> bytes:
    return msgspec.json.encode(body) if encoding == "json" else msgspec.msgpack.encode(body)


def _outcome(decode: Callable[[bytes], _T], payload: bytes) -> _T | InvalidPayload:
    """What decoding gives: the result, or the only error it may raise."""
    try:
        return decode(payload)
    except InvalidPayload as exc:
        return exc


def _valid_target(target: Any) -> bool:
    if not isinstance(target, dict) or set(target) != {"cameras", "stream"}:
        return False
    cameras, stream = target["cameras"], target["stream"]
    return (
        0 < len(cameras) <= 1000
        and all(0 < len(c) <= 256 for c in cameras)
        and ("*" not in cameras or cameras == ["*"])
        and STREAM_RE.fullmatch(stream) is not None
    )


@given(st.binary(max_size=400) | hostile_payloads)
@settings(max_examples=300)
def test_arbitrary_bytes_raise_only_invalid_payload(payload: bytes) -> None:
    for decode in (decode_group_deploy, decode_group_delete):
        got = _outcome(decode, payload)
        if isinstance(got, InvalidPayload):
            assert (got.path or "").startswith("$")


@given(bodies, st.sampled_from(["json", "msgpack"]))
@settings(max_examples=300)
def test_any_group_deploy_decodes_or_names_a_field(body: dict[str, Any], encoding: str) -> None:
    got = _outcome(decode_group_deploy, _encode(body, encoding))
    if isinstance(got, InvalidPayload):
        assert (got.path or "").startswith("$")
    else:
        assert _valid_target(body["target"])


@given(targets, st.sampled_from(["json", "msgpack"]))
@settings(max_examples=300)
def test_group_deploy_target_is_checked(target: Any, encoding: str) -> None:
    body = {
        "nn_config": {"type": "Generic"},
        "model": b"blob",
        "request_id": "g1",
        "target": target,
    }
    got = _outcome(decode_group_deploy, _encode(body, encoding))
    if isinstance(got, InvalidPayload):
        assert not _valid_target(target)
        assert (got.path or "").startswith("$.target")
        return
    assert _valid_target(target)
    deploy, decoded = got
    assert isinstance(deploy, Deploy)
    assert deploy.request_id == "g1"
    assert decoded == GroupTarget(cameras=tuple(target["cameras"]), stream=target["stream"])


@given(targets, st.sampled_from(["json", "msgpack"]))
@settings(max_examples=300)
def test_group_delete_target_is_checked(target: Any, encoding: str) -> None:
    got = _outcome(decode_group_delete, _encode({"target": target, "request_id": "d1"}, encoding))
    if isinstance(got, InvalidPayload):
        assert not _valid_target(target)
        assert (got.path or "").startswith("$.target")
        return
    assert _valid_target(target)
    assert got[1].stream == target["stream"]


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ({"cameras": [], "stream": "CAM_A"}, "$.target.cameras"),
        ({"cameras": ["*", "front"], "stream": "CAM_A"}, "$.target.cameras"),
        ({"cameras": [""], "stream": "CAM_A"}, "$.target.cameras[0]"),
        ({"cameras": ["*"], "stream": "CAM_Z"}, "$.target.stream"),
        ({"cameras": ["*"]}, "$.target"),
        ({"cameras": ["*"], "stream": "CAM_A", "streams": []}, "$.target"),
        ("everything", "$.target"),
    ],
)
def test_bad_targets_name_the_field(target: Any, path: str) -> None:
    body = {"nn_config": {"type": "Generic"}, "model": b"blob", "target": target}
    with pytest.raises(InvalidPayload) as raised:
        decode_group_deploy(msgspec.msgpack.encode(body))
    assert raised.value.path == path


def test_a_group_command_needs_a_target() -> None:
    with pytest.raises(InvalidPayload) as raised:
        decode_group_delete(b"")
    assert raised.value.path == "$.target"
    with pytest.raises(InvalidPayload) as raised:
        decode_group_deploy(
            b'{"nn_config": {"type": "Generic"}, "model_sha256": "' + b"a" * 64 + b'"}'
        )
    assert "target" in str(raised.value)
    deploy, target = decode_group_deploy(
        msgspec.msgpack.encode(
            {
                "nn_config": {"type": "Generic"},
                "model": b"m",
                "target": {"cameras": ["*"], "stream": "DEPTH_B_C"},
            }
        )
    )
    assert deploy.model == ModelUpload(b"m")
    assert target.everything


segment = st.text(alphabet="abcXYZ09-_/+#", max_size=10)


@given(segment, st.sampled_from(["deploy", "delete", "status", ""]), segment)
def test_group_topics_parse_only_for_own_groups(group: str, action: str, extra: str) -> None:
    topics = Topics.for_agent("oak", "a1", ("site-3", "entrance"))
    topic = f"oak/groups/{group}/nn/{action}" + (f"/{extra}" if extra else "")
    parsed = topics.parse(topic)
    if group in topics.groups and action in {"deploy", "delete"} and not extra:
        assert parsed == GroupCommandTopic(group, action)  # type: ignore[arg-type]
        assert topics.group_command(group, action) == topic  # type: ignore[arg-type]
    else:
        assert parsed is None


def test_group_filters() -> None:
    topics = Topics.for_agent("oak", "a1", ("site-3",))
    assert topics.group_command_filters == (
        "oak/groups/site-3/nn/deploy",
        "oak/groups/site-3/nn/delete",
    )
    assert Topics.for_agent("oak", "a1").group_command_filters == ()
    assert Topics.for_agent("oak", "a1").parse("oak/groups/site-3/nn/deploy") is None


@dataclass
class _Cam:
    mxid: str
    name: str
    streams: tuple[str, ...]


@given(
    st.lists(
        st.sampled_from(["AAA", "BBB", "CCC", "door", "yard", "nope"]), min_size=1, max_size=4
    ),
    st.sampled_from(["CAM_A", "DEPTH_B_C"]),
)
def test_selection(refs: list[str], stream: str) -> None:
    cams = [
        _Cam("AAA", "door", ("CAM_A", "CAM_B")),
        _Cam("BBB", "yard", ("CAM_A", "DEPTH_B_C")),
        _Cam("CCC", "", ("CAM_A",)),
    ]
    chosen = select(GroupTarget(cameras=tuple(refs), stream=stream), cams)  # type: ignore[arg-type]
    expected = sorted(c.mxid for c in cams if c.mxid in refs or (c.name and c.name in refs))
    assert chosen == expected
    everything = select(GroupTarget(cameras=("*",), stream=stream), cams)  # type: ignore[arg-type]
    assert everything == sorted(c.mxid for c in cams if stream in c.streams)


@pytest.mark.parametrize(
    ("groups", "problem"),
    [
        ('["site/3"]', "agent.groups"),
        ('["a+"]', "agent.groups"),
        ('[""]', "agent.groups"),
        ('["a", "a"]', "named twice"),
    ],
)
def test_config_groups_are_topic_levels(tmp_path: Path, groups: str, problem: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[agent]\nid = 'x'\ngroups = {groups}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert problem in str(raised.value)


def test_config_groups(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nid = 'x'\ngroups = ['site-3', 'entrance']\n")
    assert load_config(path).agent.groups == ("site-3", "entrance")
