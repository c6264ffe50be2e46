"""Reading NNData layers through numpy, as the depthai reader thread does (no device)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import depthai as dai
import numpy as np

from agent.cameras.base import Camera, CameraBackend
from agent.cameras.depthai import DepthaiBackend, DepthaiCamera, read_layers
from agent.config import DepthaiSection

if TYPE_CHECKING:
    from collections.abc import Mapping


def tensor(
    name: str, dims: list[int], strides: list[int], offset: int, kind: dai.TensorInfo.DataType
) -> dai.TensorInfo:
    info = dai.TensorInfo()
    info.name = name
    info.dims = dims  # innermost first, as the device reports them
    info.strides = strides
    info.offset = offset
    info.dataType = kind
    info.numDimensions = len(dims)
    return info


def test_layers_are_read_at_their_offsets_with_natural_dims() -> None:
    features = np.arange(2 * 3 * 4, dtype=np.float16).reshape(1, 2, 3, 4)
    counts = np.array([7, -1], dtype=np.int32)
    raw = np.frombuffer(features.tobytes() + counts.tobytes(), dtype=np.uint8)
    tensors = [
        tensor("features", [4, 3, 2, 1], [2, 8, 24, 48], 0, dai.TensorInfo.DataType.FP16),
        tensor("counts", [2], [4], features.nbytes, dai.TensorInfo.DataType.INT),
    ]
    first, second = read_layers(raw, tensors)
    assert (first.name, first.dims, first.dtype) == ("features", (1, 2, 3, 4), "float16")
    np.testing.assert_array_equal(first.data, features.ravel())
    assert (second.name, second.dims, second.dtype) == ("counts", (2,), "int32")
    np.testing.assert_array_equal(second.data, counts)


def test_padded_rows_are_skipped_and_missing_strides_mean_contiguous() -> None:
    # rows of 3 values padded to 4: the stride says so
    padded = np.array([[1, 2, 3, 0], [4, 5, 6, 0]], dtype=np.float16)
    raw = np.frombuffer(padded.tobytes(), dtype=np.uint8)
    (layer,) = read_layers(raw, [tensor("x", [3, 2], [2, 8], 0, dai.TensorInfo.DataType.FP16)])
    np.testing.assert_array_equal(layer.data, [1, 2, 3, 4, 5, 6])
    (dense,) = read_layers(raw, [tensor("y", [4, 2], [], 0, dai.TensorInfo.DataType.FP16)])
    np.testing.assert_array_equal(dense.data, padded.ravel())


def test_layer_data_does_not_alias_the_message_buffer() -> None:
    raw = np.zeros(4, dtype=np.uint8)
    (layer,) = read_layers(raw, [tensor("x", [4], [1], 0, dai.TensorInfo.DataType.U8F)])
    raw[:] = 9
    assert layer.data.tolist() == [0, 0, 0, 0]


def test_backend_and_camera_satisfy_the_protocols() -> None:
    # the assignments are what mypy checks
    backend: CameraBackend = DepthaiBackend(DepthaiSection())
    cameras: Mapping[str, Camera] = backend.cameras
    assert cameras == {}
    assert Camera in DepthaiCamera.__mro__


def test_a_system_logger_report_becomes_the_cameras_health() -> None:
    from agent.cameras.depthai.outputs import to_health  # noqa: PLC0415
    from agent.health import with_percent  # noqa: PLC0415
    from agent.messages import LeonCpu, MemoryUse, Temperatures  # noqa: PLC0415

    report = dai.SystemInformation()
    chip = report.chipTemperature
    chip.average, chip.css, chip.mss, chip.upa, chip.dss = 47.25, 48.5, 47.0, 46.5, 46.0
    for memory, (used, total) in (
        (report.ddrMemoryUsage, (200 << 20, 512 << 20)),
        (report.cmxMemoryUsage, (2 << 20, 2560 << 10)),
        (report.leonCssMemoryUsage, (17 << 20, 52 << 20)),
        (report.leonMssMemoryUsage, (9 << 20, 38 << 20)),
    ):
        memory.used, memory.total, memory.remaining = used, total, total - used
    report.leonCssCpuUsage.average = 0.2375  # a fraction of 1
    report.leonMssCpuUsage.average = 0.5

    health = to_health(report, uptime=12.5, dropped={"CAM_A": 3})
    assert health.uptime == 12.5
    assert health.temperature == Temperatures(average=47.25, css=48.5, mss=47.0, upa=46.5, dss=46.0)
    assert health.leon_cpu == LeonCpu(css=23.75, mss=50.0)
    assert health.dropped == {"CAM_A": 3}
    filled = with_percent(health.memory)
    assert filled.ddr == MemoryUse(used=200 << 20, total=512 << 20, percent=39.06)
    assert filled.cmx.percent == 80.0
    assert filled.leon_mss_heap.used == 9 << 20


class _Listener:
    """What the camera reports to: here, nothing is expected."""

    def on_output(self, output: object) -> None:
        raise AssertionError(output)

    def on_presence(self, camera: str, present: bool) -> None:
        raise AssertionError((camera, present))


def test_the_camera_keeps_the_latest_system_report_off_the_output_path() -> None:
    from agent.cameras.features import CameraFeatures, Sensor  # noqa: PLC0415
    from agent.cameras.pipeline import SYSINFO_XLINK  # noqa: PLC0415

    camera = DepthaiCamera(
        "14442C10D13EABCE00",
        name="front",
        features=CameraFeatures({"CAM_A": Sensor("color")}, ()),
        target="14442C10D13EABCE00",
        settings=DepthaiSection(),
        listener=_Listener(),
    )
    before = camera.health
    assert (before.uptime, before.temperature.average, before.memory.ddr.used) == (None, None, None)
    report = dai.SystemInformation()
    report.chipTemperature.average = 51.0
    # what the reader thread does with a message of the SystemLogger's queue: no Output
    assert camera._convert(SYSINFO_XLINK, report) is None
    after = camera.health
    assert after.temperature.average == 51.0
    assert after.uptime is None  # no session open: not booted
    assert camera.stats.unreadable == 0
    camera._send.close()  # what run() would have consumed and closed
    camera._receive.close()
