"""A real apply through DepthaiBackend; skipped unless depthai finds an OAK device."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from agent.cameras.base import Deployment, Output
from agent.cameras.depthai import DepthaiBackend
from agent.config import DepthaiSection
from agent.messages import GenericConfig, YoloConfig, YoloOptions
from tests.hardware import DEVICES, NO_DEVICE
from tests.test_pipeline import YOLO_ANCHORS, YOLO_MASKS, model

pytestmark = [
    pytest.mark.hardware,
    pytest.mark.anyio,
    pytest.mark.skipif(not DEVICES, reason=NO_DEVICE),
]


class Recorder:
    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.presence: list[tuple[str, bool]] = []
        self.arrived = anyio.Event()

    def on_output(self, output: Output) -> None:
        self.outputs.append(output)
        self.arrived.set()

    def on_presence(self, camera: str, present: bool) -> None:
        self.presence.append((camera, present))


async def test_generic_and_spatial_yolo_run_on_a_real_camera() -> None:
    mxid = DEVICES[0]
    backend = DepthaiBackend(DepthaiSection(allow=(mxid,), boot_timeout=60.0))
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(180):
            await tg.start(backend.run, recorder)
            assert recorder.presence == [(mxid, True)]
            camera = backend.cameras[mxid]
            plain = camera.streams[0]
            nn_set = {plain: Deployment(model("gray_tiny.blob"), GenericConfig())}
            depth = [s for s in camera.streams if s.startswith("DEPTH_")]
            if depth:
                options = YoloOptions(
                    num_classes=80, anchors=YOLO_ANCHORS, anchor_masks=dict(YOLO_MASKS)
                )
                nn_set[depth[0]] = Deployment(
                    model("yolo_tiny.blob"), YoloConfig(nn_config=options)
                )
            await camera.apply(nn_set)
            await recorder.arrived.wait()
            streams = {o.stream for o in recorder.outputs}
            assert streams == set(nn_set)  # apply returns only once every NN has produced
            layers = next(o.layers for o in recorder.outputs if o.stream == plain)
            assert layers is not None
            assert [(x.name, x.dims, x.data.size) for x in layers] == [
                ("features", (1, 8, 32, 32), 8192)
            ]
            for output in recorder.outputs:
                if output.detections is not None:
                    assert output.detections.dtype == np.float32
                    assert output.detections.shape[1] == 9
            await camera.apply({})
        tg.cancel_scope.cancel()
