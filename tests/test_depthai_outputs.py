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
