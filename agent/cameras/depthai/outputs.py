"""Device messages as `Output`s: detections as float32 rows, NNData layers as numpy copies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import depthai as dai
import numpy as np

from agent.cameras.base import DeviceHealth, Output, RawLayer
from agent.messages import DeviceMemory, LeonCpu, MemoryUse, Temperatures

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt

__all__ = ["read_layers", "to_health", "to_output"]

_NP_DTYPES: Final[dict[Any, tuple[str, type[np.generic]]]] = {
    dai.TensorInfo.DataType.FP16: ("float16", np.float16),
    dai.TensorInfo.DataType.FP32: ("float32", np.float32),
    dai.TensorInfo.DataType.U8F: ("uint8", np.uint8),
    dai.TensorInfo.DataType.I8: ("int8", np.int8),
    dai.TensorInfo.DataType.INT: ("int32", np.int32),
}


def read_layers(data: npt.NDArray[np.uint8], tensors: Sequence[Any]) -> tuple[RawLayer, ...]:
    """Every NNData layer as a flat numpy copy, dims in N, C, H, W order like the blob's."""
    layers = []
    for tensor in tensors:
        name, dtype = _NP_DTYPES[tensor.dataType]
        # depthai lists dims (and their byte strides) innermost first
        dims = tuple(int(d) for d in reversed(tensor.dims))
        strides = tuple(int(s) for s in reversed(tensor.strides))
        if len(strides) != len(dims) or not all(strides):
            strides = _contiguous(dims, np.dtype(dtype).itemsize)
        array: npt.NDArray[np.generic] = np.ndarray(
            dims, dtype=dtype, buffer=data, offset=int(tensor.offset), strides=strides
        )
        layers.append(RawLayer(tensor.name, dims, name, array.flatten()))
    return tuple(layers)


def _contiguous(dims: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = [itemsize]
    for size in reversed(dims[1:]):
        strides.append(strides[-1] * size)
    return tuple(reversed(strides))


def _detections(message: Any, *, spatial: bool) -> npt.NDArray[np.float32]:
    width = 9 if spatial else 6
    rows = [
        (d.label, d.confidence, d.xmin, d.ymin, d.xmax, d.ymax)
        + (
            (d.spatialCoordinates.x, d.spatialCoordinates.y, d.spatialCoordinates.z)
            if spatial
            else ()
        )
        for d in message.detections
    ]
    return np.array(rows, dtype=np.float32).reshape(-1, width)


def to_output(camera: str, stream: str, message: Any) -> Output:
    """One message of an NN's XLink queue; raises whatever depthai or numpy raise on a bad one."""
    seq = int(message.getSequenceNum())
    device_ts = message.getTimestampDevice().total_seconds()
    if isinstance(message, dai.SpatialImgDetections):
        rows = _detections(message, spatial=True)
        return Output(camera, stream, seq, device_ts, detections=rows)
    if isinstance(message, dai.ImgDetections):
        rows = _detections(message, spatial=False)
        return Output(camera, stream, seq, device_ts, detections=rows)
    layers = read_layers(message.getData(), message.getAllLayers())
    return Output(camera, stream, seq, device_ts, layers=layers)


def _memory(info: Any) -> MemoryUse:
    return MemoryUse(used=int(info.used), total=int(info.total))


def to_health(message: Any, *, uptime: float | None, dropped: dict[str, int]) -> DeviceHealth:
    """A SystemLogger report (`dai.SystemInformation`) as the camera's health."""
    chip = message.chipTemperature
    return DeviceHealth(
        uptime=uptime,
        temperature=Temperatures(
            average=round(float(chip.average), 2),
            css=round(float(chip.css), 2),
            mss=round(float(chip.mss), 2),
            upa=round(float(chip.upa), 2),
            dss=round(float(chip.dss), 2),
        ),
        memory=DeviceMemory(
            ddr=_memory(message.ddrMemoryUsage),
            cmx=_memory(message.cmxMemoryUsage),
            leon_css_heap=_memory(message.leonCssMemoryUsage),
            leon_mss_heap=_memory(message.leonMssMemoryUsage),
        ),
        # depthai reports the load as a fraction of 1
        leon_cpu=LeonCpu(
            css=round(100.0 * float(message.leonCssCpuUsage.average), 2),
            mss=round(100.0 * float(message.leonMssCpuUsage.average), 2),
        ),
        dropped=dropped,
    )
