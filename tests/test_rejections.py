"""Bad input gets a `rejected` event naming the code, field and reason; nothing restarts."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.topics import Topics
from tests.harness import (
    CAM1,
    YOLO,
    agent_and_observer,
    camera_spec,
    make_config,
    observe,
    response_properties,
    yolo,
)

if TYPE_CHECKING:
    from pathlib import Path

    from agent.messages import Event
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio


async def _rejected(obs: Observer, request_id: str) -> Event:
    event = await obs.outcome(request_id)
    assert event.state == "rejected", event
    assert obs.states(request_id) == ["rejected"]
    assert event.error is not None
    return event


@pytest.mark.parametrize(
    ("nn_config", "path", "reason"),
    [
        (
            yolo(iou_threshold=1.5),
            "$.nn_config.nn_config.iou_threshold",
            "<= 1.0",
        ),
        (
            {"type": "MobileNet", "nn_config": {"anchors": [1.0, 2.0]}},
            "$.nn_config.nn_config",
            "unknown field `anchors`",
        ),
        ({"type": "YOLO"}, "$.nn_config", "missing required field `nn_config`"),
        ({"type": "SSD"}, "$.nn_config.type", "Invalid value 'SSD'"),
        (
            {"type": "Generic", "num_inference_threads": 7},
            "$.nn_config.num_inference_threads",
            "<= 2",
        ),
        (
            '{"type": "YOLO", "nn_config": {"num_classes": 0}}',
            "$.nn_config.nn_config.num_classes",
            ">= 1",
        ),
        ("not json", "$.nn_config", "not a JSON object"),
    ],
)
async def test_invalid_nn_config_names_the_field(
    broker: Broker,
    tmp_path: Path,
    own_blobs: dict[str, Path],
    nn_config: Any,
    path: str,
    reason: str,
) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (app, obs):
        body = {"request_id": "bad", "nn_config": nn_config, "model": b"x"}
        await obs.deploy(CAM1, "CAM_A", body)
        event = await _rejected(obs, "bad")
        assert event.error is not None
        assert event.error.code == "invalid_payload"
        assert f"at `{path}`" in event.error.message
        assert reason in event.error.message
        assert app.coordinator.workers[CAM1].restarts == 0


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (b"\x00\x01garbage", "$"),
        (b"[1, 2]", "$"),
        (b'{"nn_config": {"type": "Generic"}}', "$.model"),
        (
            b'{"request_id": "bad id!", "nn_config": {"type": "Generic"}, "model": "eA=="}',
            "$.request_id",
        ),
        (b'{"request_id": "bad", "nn_config": {"type": "Generic"}, "model": "***"}', "$.model"),
        (
            b'{"request_id": "bad", "nn_config": {"type": "Generic"}, "model_sha256": "abc"}',
            "$.model_sha256",
        ),
    ],
)
async def test_malformed_payload(broker: Broker, tmp_path: Path, payload: bytes, path: str) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (_, obs):
        await obs.send(obs.topics.command(CAM1, "CAM_A", "deploy"), payload)
        event = await obs.wait_for(lambda: next(iter(obs.events()), None))
        assert event.state == "rejected"
        assert event.error is not None
        assert event.error.code == "invalid_payload"
        assert event.error.message.endswith(f"at `{path}`")


async def test_every_rejection_code(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    config = make_config(broker, tmp_path, max_payload_bytes=64 * 1024)
    async with agent_and_observer(broker, config) as (app, obs):
        cases: list[tuple[str, str, str, dict[str, Any]]] = [
            ("unknown_camera", "NOSUCHCAMERA", "CAM_A", {"model": blob}),
            ("unknown_camera", "lowercase", "CAM_A", {"model": blob}),
            ("unknown_stream", CAM1, "CAM_H", {"model": blob}),
            ("unknown_stream", CAM1, "DEPTH_A_B", {"model": blob}),
            ("unknown_stream", CAM1, "color", {"model": blob}),
            ("invalid_model", CAM1, "CAM_A", {"model": b"\x7fELF not a blob" * 100}),
            ("invalid_model", CAM1, "CAM_A", {"model": blob[: len(blob) // 2]}),
            ("checksum_mismatch", CAM1, "CAM_A", {"model": blob, "model_sha256": "0" * 64}),
            ("model_not_found", CAM1, "CAM_A", {"model_sha256": "1" * 64}),
            ("payload_too_large", CAM1, "CAM_A", {"model": b"\0" * 100_000}),
            ("expired", CAM1, "CAM_A", {"model": blob, "expires_at": 1_000_000_000.0}),
            (
                "incompatible_model",
                CAM1,
                "CAM_A",
                {"model": blob, "nn_config": yolo(num_classes=3)},
            ),
            (
                "incompatible_model",
                CAM1,
                "CAM_A",
                {"model": blob, "nn_config": {"type": "MobileNet"}},
            ),
            (
                "incompatible_model",
                CAM1,
                "CAM_A",
                {"model": blob, "nn_config": {"type": "YOLO", "nn_config": {"num_classes": 80}}},
            ),
        ]
        for n, (code, camera, stream, extra) in enumerate(cases):
            request_id = f"case-{n}"
            body = {"request_id": request_id, "nn_config": YOLO} | extra
            await obs.deploy(camera, stream, body)
            event = await _rejected(obs, request_id)
            assert event.error is not None
            assert event.error.code == code, (code, event.error)
            assert event.camera == camera
            assert event.stream == stream
        # the truncated blob still parses: only the sha256 reveals it; the whole one works
        assert app.coordinator.workers[CAM1].restarts == 0
        body = {"request_id": "ok", "nn_config": YOLO, "model_sha256": sha, "model": blob}
        await obs.deploy(CAM1, "CAM_A", body)
        assert (await obs.outcome("ok")).state == "succeeded"


async def test_camera_offline(broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]) -> None:
    async with agent_and_observer(broker, make_config(broker, tmp_path)) as (_, obs):
        await obs.send(obs.topics.simulator(CAM1, "unplug"), b"")
        await obs.wait_for(lambda: obs.latest(obs.topics.camera_availability(CAM1)) == b"offline")
        body = {
            "request_id": "off",
            "nn_config": YOLO,
            "model": own_blobs["yolo_tiny"].read_bytes(),
        }
        await obs.deploy(CAM1, "CAM_A", body)
        event = await _rejected(obs, "off")
        assert event.error is not None
        assert event.error.code == "camera_offline"
        status = obs.latest_json(obs.topics.camera_status(CAM1))
        assert status["state"] == "offline"


async def test_retained_command_is_never_executed(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = make_config(broker, tmp_path)
    body = {"nn_config": YOLO, "model": own_blobs["yolo_tiny"].read_bytes()}
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    async with observe(broker, topics) as early:
        # already on the broker before the agent first subscribes
        await early.deploy(CAM1, "CAM_A", body | {"request_id": "stale"}, retain=True)
        try:
            async with agent_and_observer(broker, config) as (app, obs):
                event = await _rejected(obs, "stale")
                assert event.error is not None
                assert event.error.code == "retained_command"
                if broker.mqtt5:  # MQTT 5 keeps the flag on live messages (retain as published)
                    await obs.deploy(CAM1, "CAM_B", body | {"request_id": "live"}, retain=True)
                    event = await _rejected(obs, "live")
                    assert event.error is not None
                    assert event.error.code == "retained_command"
                await obs.delete(CAM1, "CAM_C", {"request_id": "sync"})
                await obs.outcome("sync")
                assert app.coordinator.workers[CAM1].restarts == 0
                assert obs.latest_json(topics.nn_status(CAM1, "CAM_A"))["state"] == "none"
        finally:
            for stream in ("CAM_A", "CAM_B"):
                await early.send(topics.command(CAM1, stream, "deploy"), b"", retain=True)


async def test_mqtt5_response_topic_and_correlation_data(
    mqtt5: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    async with agent_and_observer(mqtt5, make_config(mqtt5, tmp_path)) as (_, obs):
        # outside the prefix: nothing under it may receive replies
        reply_topic = f"replies-{obs.topics.base.replace('/', '-')}/me"
        await obs.client.subscribe(reply_topic, qos=1)
        body = {"request_id": "rt", "nn_config": YOLO, "model": own_blobs["yolo_tiny"].read_bytes()}
        properties = response_properties(reply_topic, b"\x01corr")
        await obs.deploy(CAM1, "CAM_A", body, properties=properties)
        await obs.outcome("rt")
        replies = await obs.wait_for(lambda: obs.on(reply_topic)[2:] and obs.on(reply_topic))
        states = [msgspec.json.decode(m.payload)["state"] for m in replies]
        assert states == ["accepted", "applying", "succeeded"]
        for reply in replies:
            assert reply.properties is not None
            assert getattr(reply.properties, "CorrelationData", None) == b"\x01corr"
        # a rejection is answered on the response topic too
        bad = response_properties(reply_topic, b"\x02")
        await obs.deploy(CAM1, "CAM_Z", {"nn_config": YOLO, "model": b"x"}, properties=bad)
        last = await obs.wait_for(
            lambda: obs.on(reply_topic)[3] if len(obs.on(reply_topic)) > 3 else None
        )
        assert msgspec.json.decode(last.payload)["error"]["code"] == "unknown_stream"
        assert last.properties is not None
        assert getattr(last.properties, "CorrelationData", None) == b"\x02"


@pytest.mark.parametrize(
    ("reply_topic", "reason"),
    [
        ("{base}/cameras/X/streams/CAM_A/nn/deploy", "must not be under"),
        ("{base}-replies/me", "must not be under"),
        ("r/+/x", "wildcards"),
    ],
)
async def test_unusable_response_topic_is_rejected_and_the_session_survives(
    mqtt5: Broker, tmp_path: Path, own_blobs: dict[str, Path], reply_topic: str, reason: str
) -> None:
    async with agent_and_observer(mqtt5, make_config(mqtt5, tmp_path)) as (app, obs):
        topic = reply_topic.format(base=obs.topics.base)
        body = {"request_id": "rt", "nn_config": YOLO, "model": own_blobs["yolo_tiny"].read_bytes()}
        await obs.deploy(CAM1, "CAM_A", body, properties=response_properties(topic, b"c"))
        event = await _rejected(obs, "rt")
        assert event.error is not None
        assert event.error.code == "invalid_payload"
        assert "Response Topic" in event.error.message
        assert reason in event.error.message
        # the agent keeps serving, and nothing went to the refused topic
        await obs.delete(CAM1, "CAM_B", {"request_id": "after"})
        assert (await obs.outcome("after")).state == "succeeded"
        assert not obs.on(topic)
        # no event was refused by paho and the session was never torn down
        assert app.link.stats.events_dropped == 0
        assert app.link.stats.connects == 1


async def test_simulator_knobs_absent_without_simulated_cameras_of_that_id(
    broker: Broker, tmp_path: Path
) -> None:
    config = make_config(broker, tmp_path, cameras=(camera_spec(CAM1),))
    async with agent_and_observer(broker, config) as (app, obs):
        await obs.send(obs.topics.simulator("NOSUCH", "unplug"), b"")
        await obs.send(obs.topics.simulator(CAM1, "fail_next_boot"), b"", retain=True)
        await obs.delete(CAM1, "CAM_A", {"request_id": "probe"})
        assert (await obs.outcome("probe")).state == "succeeded"
        assert app.backend.cameras[CAM1].present
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.send(obs.topics.simulator(CAM1, "fail_next_boot"), b"", retain=True)
