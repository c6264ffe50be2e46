"""Group commands under `[security]`: signed over the group topic, each camera authorised
for the key that signed, signed commands fresh (request_id, expires_at) as for one camera."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.topics import Topics
from tests.harness import CAM1, CAM2, agent_and_observer, make_config
from tests.test_signed_commands import (
    BLOB,
    CAM1_ONLY,
    STRANGER,
    code,
    publish,
    security,
    signed,
)

if TYPE_CHECKING:
    from pathlib import Path

    from agent.messages import Event
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio


def _body(request_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "nn_config": {"type": "MobileNet"},
        "model": BLOB,
        "expires_at": time.time() + 60,
        "target": {"cameras": ["*"], "stream": "CAM_A"},
        **extra,
    }


async def _answers(obs: Observer, request_id: str, cameras: set[str]) -> dict[str, Event]:
    def found() -> dict[str, Event] | None:
        done = {e.camera: e for e in obs.events(request_id) if e.terminal}
        return done if set(done) >= cameras else None

    return await obs.wait_for(found, what=f"{request_id} for {sorted(cameras)}")


@pytest.mark.parametrize("carrier", ["user properties", "envelope"])
async def test_signed_group_commands(broker: Broker, tmp_path: Path, carrier: str) -> None:
    if carrier == "user properties" and not broker.mqtt5:
        pytest.skip("user properties need MQTT 5")
    group = f"sg-{uuid.uuid4().hex[:8]}"
    config = make_config(broker, tmp_path / "state", security=security(), groups=(group,))
    topic = Topics.for_agent("oaktest", "x", (group,)).group_command(group, "deploy")
    envelope = carrier == "envelope"
    async with agent_and_observer(broker, config) as (_, obs):
        # signed for the group topic by a key for every camera: both cameras run it
        await publish(obs, topic, signed(topic, _body("ops"), as_envelope=envelope))
        got = await _answers(obs, "ops", {CAM1, CAM2})
        assert {e.state for e in got.values()} == {"succeeded"}
        assert {e.group for e in got.values()} == {group}
        # a key for CAM1 only: CAM1 runs it, CAM2 is refused, by camera
        body = _body(
            "cam1", nn_config={"type": "MobileNet", "nn_config": {"confidence_threshold": 0.7}}
        )
        await publish(obs, topic, signed(topic, body, CAM1_ONLY, "cam1", as_envelope=envelope))
        got = await _answers(obs, "cam1", {CAM1, CAM2})
        assert got[CAM1].state == "succeeded"
        assert (got[CAM2].state, code(got[CAM2])) == ("rejected", "unauthorized")
        # signed for one camera's topic, sent to the group: the signature does not verify
        camera_topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        message = signed(topic, _body("moved"), sign_for=camera_topic, as_envelope=envelope)
        await publish(obs, topic, message)
        moved = (await _answers(obs, "moved", {""}))[""]
        assert (moved.state, code(moved)) == ("rejected", "bad_signature")
        # unsigned, or signed by a stranger: refused as a whole
        await obs.send(topic, msgspec.json.encode(_body("plain")))
        plain = (await _answers(obs, "plain", {""}))[""]
        assert (plain.state, code(plain)) == ("rejected", "unauthorized")
        await publish(
            obs, topic, signed(topic, _body("odd"), STRANGER, "odd", as_envelope=envelope)
        )
        odd = (await _answers(obs, "odd", {""}))[""]
        assert (odd.state, code(odd)) == ("rejected", "unauthorized")
        # a signed command needs expires_at
        stale = {k: v for k, v in _body("stale").items() if k != "expires_at"}
        await publish(obs, topic, signed(topic, stale, as_envelope=envelope))
        refused = (await _answers(obs, "stale", {""}))[""]
        assert (refused.state, code(refused)) == ("rejected", "invalid_payload")
        assert refused.error is not None
        assert "$.expires_at" in refused.error.message
        # nothing but the two signed commands ever ran
        for camera in (CAM1, CAM2):
            accepted = [
                e.request_id for e in obs.events() if e.camera == camera and e.state == "accepted"
            ]
            assert accepted == (["ops", "cam1"] if camera == CAM1 else ["ops"])
