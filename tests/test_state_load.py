"""A state file that does not decode, however it fails, is kept aside and the agent starts."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import pytest

from tests.harness import CAM1, YOLO, agent_and_observer, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

_DEEP = 5000
_CAMERA = b'"cameras": {"' + CAM1.encode() + b'": {}}'

UNREADABLE = {
    "invalid UTF-8 in a string": b'{"version": 1, "outcomes": [], "x": "\xff", ' + _CAMERA + b"}",
    "invalid UTF-8 in a typed string": (
        b'{"version": 1, "in_flight": [{"request_id": "\xff", "action": "deploy", '
        b'"camera": "C", "stream": "CAM_A"}]}'
    ),
    "deep nesting in an unknown field": (
        b'{"version": 1, "x": ' + b"[" * _DEEP + b"]" * _DEEP + b"}"
    ),
    "deep nesting of objects": b'{"a":' * _DEEP + b"1" + b"}" * _DEEP,
    "deep nesting, unterminated": b"[" * _DEEP,
    "not JSON at all": b"\x81\xa1x\xc0",
    "empty": b"",
}


@pytest.mark.parametrize("content", list(UNREADABLE.values()), ids=list(UNREADABLE))
async def test_unreadable_state_file_is_kept_aside_and_the_agent_serves(
    broker: Broker, tmp_path: Path, content: bytes
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_bytes(content)
    async with agent_and_observer(broker, make_config(broker, state_dir)) as (app, obs):
        error = await obs.wait_for(lambda: obs.latest_json(obs.topics.errors))
        assert error["code"] == "state_unreadable"
        assert "kept as state.json.unreadable-" in error["message"]
        assert len(error["message"]) < 1000
        kept = list(state_dir.glob("state.json.unreadable-*"))
        assert len(kept) == 1
        assert kept[0].read_bytes() == content
        await obs.delete(CAM1, "CAM_A", {"request_id": "after"})
        assert (await obs.outcome("after")).state == "succeeded"
        assert app.coordinator.workers[CAM1].restarts == 0


async def test_a_state_file_from_before_previous_models_and_stored_groups_loads(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """`cameras.*.previous` and `in_flight[].group` are new: a file without them loads, and
    the agent keeps previous models from then on."""
    yolo, ssd = own_blobs["yolo_tiny"].read_bytes(), own_blobs["ssd_tiny"].read_bytes()
    state_dir = tmp_path / "state"
    config = make_config(broker, state_dir)
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", {"request_id": "d", "nn_config": YOLO, "model": yolo})
        assert (await obs.outcome("d")).state == "succeeded"
    path = state_dir / "state.json"
    document = json.loads(path.read_bytes())
    for camera in document["cameras"].values():
        del camera["previous"]  # as an agent before it wrote the file
    document["in_flight"] = [
        {"request_id": "old", "action": "delete", "camera": CAM1, "stream": "CAM_B"}
    ]
    path.write_text(json.dumps(document))
    async with agent_and_observer(broker, config) as (app, obs):
        old = await obs.outcome("old")
        assert (old.state, old.error and old.error.code, old.group) == (
            "failed",
            "interrupted",
            None,
        )
        await obs.wait_for(lambda: obs.detections(CAM1, "CAM_A"), what="restored")
        assert obs.latest(obs.topics.errors) is None
        body = {"request_id": "s", "nn_config": {"type": "MobileNet"}, "model": ssd}
        await obs.deploy(CAM1, "CAM_A", body, encoding="msgpack")
        assert (await obs.outcome("s")).state == "succeeded"
        assert app.coordinator.workers[CAM1].slots.previous() == {
            "CAM_A": hashlib.sha256(yolo).hexdigest()
        }
    assert json.loads(path.read_bytes())["cameras"][CAM1]["previous"] == {
        "CAM_A": hashlib.sha256(yolo).hexdigest()
    }
