"""The behavioural suite over MQTT, run against each camera backend.

The same agent, harness and commands for both: every NN type deployed in JSON and
MessagePack to a plain sensor stream (and YOLO on a DEPTH stream when the camera has a
stereo pair), detections received, an identical redeploy that needs no restart, a model
that cannot run rejected before any restart, and a delete. The simulator variant always
runs; the depthai variant (marked `hardware`) runs when depthai finds an OAK device, with
waits long enough for real boots (20-60 s each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.config import DepthaiSection
from tests.hardware import DEVICES, NO_DEVICE
from tests.harness import CAM1, WAIT, YOLO, agent_and_observer, camera_spec, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config import Config
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True)
class Backend:
    """One camera backend under test: the camera it drives and how long to wait for it."""

    name: str
    mxid: str
    boot_wait: float  # a deploy's outcome: a boot (with retries), then the first output
    output_wait: float  # the first outputs of an NN that runs

    def config(self, broker: Broker, state_dir: Path) -> Config:
        if self.name == "simulator":
            return make_config(broker, state_dir, cameras=(camera_spec(self.mxid),))
        config = make_config(broker, state_dir)
        depthai = DepthaiSection(allow=(self.mxid,), boot_timeout=60.0, first_output_timeout=30.0)
        return msgspec.structs.replace(config, simulator=None, depthai=depthai)


_SIMULATOR = Backend("simulator", CAM1, boot_wait=WAIT, output_wait=WAIT)
_DEPTHAI = Backend("depthai", DEVICES[0] if DEVICES else "", boot_wait=240.0, output_wait=60.0)


@pytest.fixture(
    params=[
        pytest.param(_SIMULATOR, id="simulator"),
        pytest.param(
            _DEPTHAI,
            id="depthai",
            marks=[pytest.mark.hardware, pytest.mark.skipif(not DEVICES, reason=NO_DEVICE)],
        ),
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    chosen: Backend = request.param
    return chosen


async def _succeeds(obs: Observer, request_id: str, backend: Backend) -> None:
    event = await obs.outcome(request_id, timeout=backend.boot_wait)
    assert (event.state, event.error) == ("succeeded", None), event


async def test_every_nn_type_over_mqtt(
    backend: Backend, broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    mxid = backend.mxid
    async with agent_and_observer(broker, backend.config(broker, tmp_path)) as (app, obs):
        await obs.wait_for(lambda: mxid in app.backend.cameras, backend.boot_wait, "adopted")
        assert app.backend.name == backend.name
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
            body = {"request_id": f"be-{name}", "nn_config": nn_config, "model": blob}
            await obs.deploy(mxid, plain, body, encoding=encoding)
            await _succeeds(obs, f"be-{name}", backend)
            seen = len(obs.detections(mxid, plain))

            def produced(seen: int = seen) -> bool:
                return len(obs.detections(mxid, plain)) > seen + 2

            await obs.wait_for(produced, backend.output_wait, "outputs of the new NN")
            last = obs.detections(mxid, plain)[-1]
            assert last["type"] == nn_config["type"]
            assert ("layers" in last) == (name == "generic")

        # the same model and config again: answered without a restart
        restarts = app.coordinator.workers[mxid].restarts
        body = {"request_id": "be-same", "nn_config": {"type": "Generic"}, "model": gray}
        await obs.deploy(mxid, plain, body)
        await _succeeds(obs, "be-same", backend)
        assert app.coordinator.workers[mxid].restarts == restarts

        # a MobileNet config on a YOLO-shaped blob is refused before the camera goes down
        body = {"request_id": "be-bad", "nn_config": {"type": "MobileNet"}, "model": yolo}
        await obs.deploy(mxid, plain, body)
        rejected = await obs.outcome("be-bad")
        assert rejected.error is not None
        assert rejected.error.code == "incompatible_model"
        assert app.coordinator.workers[mxid].restarts == restarts

        depth = [s for s in streams if s.startswith("DEPTH_")]
        if depth:
            body = {"request_id": "be-depth", "nn_config": YOLO, "model": yolo}
            await obs.deploy(mxid, depth[0], body, encoding="msgpack")
            await _succeeds(obs, "be-depth", backend)
            await obs.wait_for(
                lambda: len(obs.detections(mxid, depth[0])) > 2, backend.output_wait, "outputs"
            )
            # random weights may detect nothing; whatever they detect has coordinates in mm
            found = [d for m in obs.detections(mxid, depth[0]) for d in m["detections"]]
            assert all(set(d["spatial_coords"]) == {"x", "y", "z"} for d in found)
            await obs.delete(mxid, depth[0], {"request_id": "be-depth-off"})
            await _succeeds(obs, "be-depth-off", backend)

        await obs.delete(mxid, plain, {"request_id": "be-off"})
        await _succeeds(obs, "be-off", backend)
        status = obs.latest_json(obs.topics.nn_status(mxid, plain))
        assert status["state"] == "none"
        # every detection published was counted before the restart's status went out
        counted = obs.topics.camera_status(mxid)
        await obs.wait_for(
            lambda: (
                obs.latest_json(counted)["stats"]["outputs"] >= len(obs.detections(mxid, plain)) > 0
            ),
            what="the outputs counted in the camera status",
        )
