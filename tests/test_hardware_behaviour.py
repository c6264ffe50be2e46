"""The behavioural suite over MQTT against a real OAK; skipped unless depthai finds one.

The same agent, harness and commands as the simulator tests, with the depthai backend:
every NN type deployed in JSON and MessagePack to a plain sensor stream (and YOLO on a
DEPTH stream when the camera has a stereo pair), detections received, an identical
redeploy that needs no restart, a model that cannot run rejected before any restart, and
a delete. Real boots take 20-60 s, so the waits are long.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.config import DepthaiSection
from tests.hardware import DEVICES, NO_DEVICE
from tests.harness import YOLO, agent_and_observer, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = [
    pytest.mark.hardware,
    pytest.mark.anyio,
    pytest.mark.skipif(not DEVICES, reason=NO_DEVICE),
]

BOOT_WAIT = 240.0  # a boot with retries, then the first output


def _config(broker: Broker, state_dir: Path) -> Any:
    config = make_config(broker, state_dir)
    depthai = DepthaiSection(allow=(DEVICES[0],), boot_timeout=60.0, first_output_timeout=30.0)
    return msgspec.structs.replace(config, simulator=None, depthai=depthai)


async def _succeeds(obs: Observer, request_id: str) -> None:
    event = await obs.outcome(request_id, timeout=BOOT_WAIT)
    assert (event.state, event.error) == ("succeeded", None), event


async def test_every_nn_type_over_mqtt_on_a_real_camera(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    mxid = DEVICES[0]
    async with agent_and_observer(broker, _config(broker, tmp_path)) as (app, obs):
        await obs.wait_for(lambda: mxid in app.backend.cameras, BOOT_WAIT, "camera adopted")
        streams = app.backend.cameras[mxid].streams
        plain = streams[0]
        yolo = own_blobs["yolo_tiny"].read_bytes()
        ssd = own_blobs["ssd_tiny"].read_bytes()
        gray = own_blobs["gray_tiny"].read_bytes()
        cases: list[tuple[str, dict[str, Any], bytes, str]] = [
            ("yolo", YOLO, yolo, "json"),
            ("ssd", {"type": "MobileNet"}, ssd, "msgpack"),
            ("generic", {"type": "Generic"}, gray, "json"),
        ]
        for name, nn_config, blob, encoding in cases:
            body = {"request_id": f"hw-{name}", "nn_config": nn_config, "model": blob}
            await obs.deploy(mxid, plain, body, encoding=encoding)
            await _succeeds(obs, f"hw-{name}")
            seen = len(obs.detections(mxid, plain))

            def produced(seen: int = seen) -> bool:
                return len(obs.detections(mxid, plain)) > seen + 2

            await obs.wait_for(produced, 30.0, "outputs of the new NN")
            last = obs.detections(mxid, plain)[-1]
            assert last["type"] == nn_config["type"]
            assert ("layers" in last) == (name == "generic")

        # the same model and config again: answered without a restart
        restarts = app.coordinator.workers[mxid].restarts
        body = {"request_id": "hw-same", "nn_config": {"type": "Generic"}, "model": gray}
        await obs.deploy(mxid, plain, body)
        await _succeeds(obs, "hw-same")
        assert app.coordinator.workers[mxid].restarts == restarts

        # a MobileNet config on a YOLO-shaped blob is refused before the camera goes down
        body = {"request_id": "hw-bad", "nn_config": {"type": "MobileNet"}, "model": yolo}
        await obs.deploy(mxid, plain, body)
        rejected = await obs.outcome("hw-bad")
        assert rejected.error is not None
        assert rejected.error.code == "incompatible_model"
        assert app.coordinator.workers[mxid].restarts == restarts

        depth = [s for s in streams if s.startswith("DEPTH_")]
        if depth:
            body = {"request_id": "hw-depth", "nn_config": YOLO, "model": yolo}
            await obs.deploy(mxid, depth[0], body, encoding="msgpack")
            await _succeeds(obs, "hw-depth")
            await obs.wait_for(lambda: len(obs.detections(mxid, depth[0])) > 2, 60.0, "outputs")
            # random weights may detect nothing; whatever they detect has coordinates in mm
            found = [d for m in obs.detections(mxid, depth[0]) for d in m["detections"]]
            assert all(set(d["spatial_coords"]) == {"x", "y", "z"} for d in found)
            await obs.delete(mxid, depth[0], {"request_id": "hw-depth-off"})
            await _succeeds(obs, "hw-depth-off")

        await obs.delete(mxid, plain, {"request_id": "hw-off"})
        await _succeeds(obs, "hw-off")
        status = obs.latest_json(obs.topics.nn_status(mxid, plain))
        assert status["state"] == "none"
