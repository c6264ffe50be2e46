"""Hostile commands over MQTT: each is answered `rejected`, and the agent serves the next one.

Every case here once took the agent down or answered `internal` (issue 15): invalid UTF-8
inside a string, nesting deep enough to exhaust the decoder's recursion, a Response Topic
that relays the agent's events onto another agent's command topic, and input big enough
to bloat the state file or echoed in full in an error message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from tests.harness import (
    CAM1,
    YOLO,
    agent_and_observer,
    make_config,
    response_properties,
    yolo,
)

if TYPE_CHECKING:
    from pathlib import Path

    from agent.app import App
    from agent.messages import Event
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

_GENERIC = b'"nn_config": {"type": "Generic"}, "model": "eA=="'
_DEEP = 1000


def _mp_deploy(**fields: Any) -> bytes:
    return msgspec.msgpack.encode({"nn_config": {"type": "Generic"}, "model": b"x", **fields})


# (action, payload, words the error message must contain)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("delete", b'{"request_id":"\xff"}', "UTF-8"),
    ("deploy", b'{"request_id":"\xff",' + _GENERIC + b"}", "UTF-8"),
    ("deploy", b'{"model_name":"\xff",' + _GENERIC + b"}", "UTF-8"),
    ("deploy", b'{"labels":["ok","\xff"],' + _GENERIC + b"}", "UTF-8"),
    ("deploy", b'{"nn_config":"{\\"type\\": \\"\xff\\"}", "model": "eA=="}', "UTF-8"),
    ("delete", b"\x81\xaarequest_id\xa1\xff", "UTF-8"),
    ("deploy", _mp_deploy(model_name="\x01").replace(b"\xa1\x01", b"\xa1\xff"), "UTF-8"),
    # nesting, in a field the schema types, in one it ignores, and in nn_config's JSON string
    ("delete", b'{"request_id":' + b"[" * _DEEP + b"]" * _DEEP + b"}", "nesting"),
    ("deploy", b'{"labels":' + b"[" * _DEEP + b"]" * _DEEP + b"," + _GENERIC + b"}", "nesting"),
    ("delete", b'{"x":' * _DEEP + b"1" + b"}" * _DEEP, "nesting"),
    ("deploy", b'{"x":' * _DEEP + b"1" + b"}" * _DEEP, "nesting"),
    ("deploy", b'{"nn_config":"' + b'{\\"a\\":' * _DEEP + b'1", "model": "eA=="}', "nesting"),
    ("delete", b"\x81\xaarequest_id" + b"\x91" * _DEEP + b"\xc0", "nesting"),
    ("deploy", b"\x82\xa1x" + b"\x91" * _DEEP + b"\xc0" + _mp_deploy()[1:], "nesting"),
    ("delete", b"\x81\xa1x" * _DEEP + b"\xc0", "nesting"),
    ("deploy", b"\x81\xa1x" * _DEEP + b"\xc0", "nesting"),
    # just over the limit, and unterminated
    ("delete", b'{"x":' + b"[" * 40 + b"]" * 40 + b"}", "nesting"),
    ("delete", b'{"x":' + b"[" * _DEEP, "nesting"),
]


async def _answer(obs: Observer, before: int) -> Event:
    def terminal() -> list[Event]:
        return [e for e in obs.events() if e.terminal]

    await obs.wait_for(lambda: len(terminal()) > before, what="an answer")
    return terminal()[before]


async def _still_serves(obs: Observer, app: App, request_id: str) -> None:
    await obs.delete(CAM1, "CAM_B", {"request_id": request_id})
    assert (await obs.outcome(request_id)).state == "succeeded"
    assert app.coordinator.workers[CAM1].restarts == 0


async def test_hostile_payloads_are_rejected_and_the_agent_serves_on(
    broker: Broker, tmp_path: Path
) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (app, obs):
        for n, (action, payload, words) in enumerate(HOSTILE):
            before = len([e for e in obs.events() if e.terminal])
            await obs.send(obs.topics.command(CAM1, "CAM_A", action), payload)  # type: ignore[arg-type]
            answer = await _answer(obs, before)
            assert answer.state == "rejected", (n, answer)
            assert answer.error is not None
            assert answer.error.code == "invalid_payload", (n, answer.error)
            assert words in answer.error.message, (n, answer.error)
            await _still_serves(obs, app, f"after-{n}")


async def test_nesting_within_the_limit_is_decoded(broker: Broker, tmp_path: Path) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (app, obs):
        # an ignored field 30 levels deep: the command itself is fine
        payload = b'{"request_id": "deep-ok", "x":' + b"[" * 30 + b"]" * 30 + b"}"
        await obs.send(obs.topics.command(CAM1, "CAM_A", "delete"), payload)
        assert (await obs.outcome("deep-ok")).state == "succeeded"
        await _still_serves(obs, app, "after")


async def test_long_echoes_are_truncated(broker: Broker, tmp_path: Path) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (app, obs):
        mxid = "A" * 60_000
        await obs.delete(mxid, "CAM_A", {"request_id": "long-mxid"})
        event = await obs.outcome("long-mxid")
        assert event.error is not None
        assert event.error.code == "unknown_camera"
        assert len(event.error.message) < 300, len(event.error.message)
        assert "60000 chars" in event.error.message
        stream = "S" * 10_000
        await obs.delete(CAM1, stream, {"request_id": "long-stream"})
        event = await obs.outcome("long-stream")
        assert event.error is not None
        assert event.error.code == "unknown_stream"
        assert len(event.error.message) < 300, len(event.error.message)
        # a msgspec message that quotes the input (an unknown nn_config type, a field name)
        for n, nn_config in enumerate(
            [{"type": "T" * 50_000}, {"type": "MobileNet", "nn_config": {"k" * 50_000: 1}}]
        ):
            body = {"request_id": f"long-{n}", "nn_config": nn_config, "model": b"x"}
            await obs.deploy(CAM1, "CAM_A", body)
            event = await obs.outcome(f"long-{n}")
            assert event.error is not None
            assert event.error.code == "invalid_payload"
            assert len(event.error.message) < 400, len(event.error.message)
            assert event.error.message.endswith("`"), event.error.message  # the path survives
        await _still_serves(obs, app, "after")


@pytest.mark.parametrize("expires_at", ["nan", "inf", "-inf"])
async def test_non_finite_expires_at_is_rejected(
    broker: Broker, tmp_path: Path, expires_at: str
) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (app, obs):
        body = {"request_id": "nf", "expires_at": float(expires_at)}
        await obs.send(obs.topics.command(CAM1, "CAM_A", "delete"), msgspec.msgpack.encode(body))
        event = await obs.outcome("nf")
        assert event.state == "rejected"
        assert event.error is not None
        assert event.error.code == "invalid_payload", event.error
        assert "$.expires_at" in event.error.message
        await _still_serves(obs, app, "after")


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("labels", [f"l{i}" for i in range(1001)], "$.labels"),
        ("labels", ["x" * 256] * 300, "$.labels"),  # 300 x 256 B: over 64 KiB in total
        ("labels", ["x" * 257], "$.labels[0]"),
        ("model_name", "n" * 257, "$.model_name"),
        ("nn_config", yolo(anchors=[1.0] * 1001), "$.nn_config.nn_config.anchors"),
        (
            "nn_config",
            yolo(anchor_masks={f"side{i}": [0] for i in range(65)}),
            "$.nn_config.nn_config.anchor_masks",
        ),
        ("nn_config", yolo(anchor_masks={"s" * 65: [0]}), "$.nn_config.nn_config.anchor_masks"),
        (
            "nn_config",
            yolo(anchor_masks={"side13": [0] * 1001}),
            "$.nn_config.nn_config.anchor_masks[...]",
        ),
        ("nn_config", "x" * 70_000, "$.nn_config"),
    ],
)
async def test_oversized_fields_are_rejected(
    broker: Broker, tmp_path: Path, field: str, value: Any, path: str
) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (app, obs):
        body = {"request_id": "big", "nn_config": YOLO, "model": b"x", field: value}
        await obs.deploy(CAM1, "CAM_A", body)
        event = await obs.outcome("big")
        assert event.error is not None
        assert event.error.code == "invalid_payload", event.error
        assert f"at `{path}`" in event.error.message, event.error
        await _still_serves(obs, app, "after")


@pytest.mark.parametrize(
    "reply_to",
    [
        "{b}/cameras/{cam}/streams/CAM_A/nn/delete",
        "{b}/cameras/{cam}/streams/CAM_A/nn/deploy",
        "{b}/simulator/cameras/{cam}/unplug",
        "{b}/models/{sha}/upload",
        "{prefix}/dashboard/replies",
        "{prefix}",
    ],
)
async def test_response_topic_cannot_relay_to_another_agent(
    mqtt5: Broker, tmp_path: Path, own_blobs: dict[str, Path], reply_to: str
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    config_a = make_config(mqtt5, tmp_path / "a")
    config_b = make_config(mqtt5, tmp_path / "b")
    async with (
        agent_and_observer(mqtt5, config_a) as (app_a, obs_a),
        agent_and_observer(mqtt5, config_b) as (app_b, obs_b),
    ):
        await obs_b.deploy(
            CAM1, "CAM_A", {"request_id": "b-model", "nn_config": YOLO, "model": blob}
        )
        assert (await obs_b.outcome("b-model")).state == "succeeded"
        topic = reply_to.format(
            b=obs_b.topics.base, prefix=config_b.mqtt.prefix, cam=CAM1, sha="0" * 64
        )
        sent_there = len(obs_b.on(topic))  # B's deploy above went to one of them
        properties = response_properties(topic, b"relay")
        payload = msgspec.json.encode({"request_id": "relay"})
        await obs_a.send(obs_a.topics.command(CAM1, "CAM_A", "delete"), payload, False, properties)
        event = await obs_a.outcome("relay")
        assert event.state == "rejected"
        assert event.error is not None
        assert event.error.code == "invalid_payload"
        assert "Response Topic" in event.error.message
        assert f"{config_b.mqtt.prefix}/" in event.error.message
        # B got nothing from A and keeps its model; A serves on
        await obs_b.delete(CAM1, "CAM_B", {"request_id": "b-barrier"})
        assert (await obs_b.outcome("b-barrier")).state == "succeeded"
        assert len(obs_b.on(topic)) == sent_there
        assert app_b.coordinator.workers[CAM1].running["CAM_A"].request_id == "b-model"
        assert obs_b.latest_json(obs_b.topics.nn_status(CAM1, "CAM_A"))["state"] == "running"
        await _still_serves(obs_a, app_a, "a-after")
