"""A state file that does not decode, however it fails, is kept aside and the agent starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.harness import CAM1, agent_and_observer, make_config

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
