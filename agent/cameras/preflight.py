"""Pre-flight checks: refuse a model that cannot run before a camera is taken down for it.

Pure functions over the parsed blob (`agent.models.BlobInfo`, dims in N, C, H, W order) and
the camera's features; no device and no depthai import. depthai accepts many wrong
configurations silently and fails only on the device, 20-60 s later, so everything that can
be known from the blob is checked here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

from agent.errors import IncompatibleModel, UnknownStream
from agent.messages import MobileNetConfig, YoloConfig

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.cameras.base import Deployment
    from agent.cameras.features import CameraFeatures
    from agent.messages import YoloOptions
    from agent.models import TensorInfo

__all__ = ["SUPPORTED_OPENVINO", "blob_versions_compatible", "check"]

# dai.OpenVINO.getVersions() of depthai 2.31-2.33; tests/test_preflight.py keeps it in sync
SUPPORTED_OPENVINO: Final = ("2020.3", "2020.4", "2021.1", "2021.2", "2021.3", "2021.4", "2022.1")
# 2020.3 blobs share a pipeline with no other version (OpenVINO.areVersionsBlobCompatible)
_ISOLATED_OPENVINO: Final = "2020.3"
_IMAGE_CHANNELS: Final = (1, 3)
_SSD_FIELDS: Final = 7  # image_id, label, confidence, xmin, ymin, xmax, ymax


def check(
    features: CameraFeatures,
    stream: str,
    deployment: Deployment,
    *,
    camera: str = "",
    others: Mapping[str, Deployment] | None = None,
) -> None:
    """Raise UnknownStream or IncompatibleModel when `deployment` cannot run on `stream`.

    `others` are the NNs that will share the camera's pipeline (other streams); their blobs
    must be of a compatible OpenVINO version.
    """
    if stream not in features.streams:
        raise UnknownStream(camera=camera, stream=stream, available=features.streams)
    info = deployment.model.info
    if info.version not in SUPPORTED_OPENVINO:
        raise IncompatibleModel(
            f"blob is for OpenVINO {info.version}; depthai 2.x runs {', '.join(SUPPORTED_OPENVINO)}"
        )
    for other_stream, other in sorted((others or {}).items()):
        theirs = other.model.info.version
        if other_stream != stream and not blob_versions_compatible(info.version, theirs):
            raise IncompatibleModel(
                f"blob is for OpenVINO {info.version} but the NN on {other_stream} is for "
                f"{theirs}; one camera pipeline cannot run both"
            )
    _check_input(info.inputs)
    config = deployment.nn_config
    if isinstance(config, YoloConfig):
        _check_yolo(config.nn_config, info.outputs)
    elif isinstance(config, MobileNetConfig):
        _check_mobilenet(info.outputs)


def blob_versions_compatible(a: str, b: str) -> bool:
    """True when blobs of OpenVINO versions `a` and `b` can run in one pipeline."""
    return a == b or _ISOLATED_OPENVINO not in (a, b)


def _shape(tensor: TensorInfo) -> str:
    return "[" + ", ".join(str(d) for d in tensor.dims) + "]"


def _check_input(inputs: tuple[TensorInfo, ...]) -> None:
    if len(inputs) != 1:
        names = ", ".join(t.name for t in inputs)
        raise IncompatibleModel(
            f"blob has {len(inputs)} inputs ({names}); a camera stream feeds exactly one image"
        )
    tensor = inputs[0]
    dims = tensor.dims
    if len(dims) != 4 or dims[0] != 1 or dims[1] not in _IMAGE_CHANNELS or min(dims) < 1:
        raise IncompatibleModel(
            f"input {tensor.name!r} is {_shape(tensor)}; a camera stream feeds an image "
            "[1, C, H, W] with C = 1 (grey) or 3 (BGR)"
        )
    if tensor.dtype != "uint8":
        raise IncompatibleModel(
            f"input {tensor.name!r} is {tensor.dtype}; camera frames are 8-bit, "
            "compile the blob with `-ip U8`"
        )


def _check_mobilenet(outputs: tuple[TensorInfo, ...]) -> None:
    if len(outputs) != 1:
        names = ", ".join(t.name for t in outputs)
        raise IncompatibleModel(
            f"MobileNet needs one DetectionOutput layer [1, 1, N, 7]; blob has "
            f"{len(outputs)} outputs ({names})"
        )
    tensor = outputs[0]
    dims = tensor.dims
    if len(dims) != 4 or dims[:2] != (1, 1) or dims[3] != _SSD_FIELDS or dims[2] < 1:
        raise IncompatibleModel(
            f"MobileNet needs one DetectionOutput layer [1, 1, N, 7]; "
            f"output {tensor.name!r} is {_shape(tensor)}"
        )


def _check_yolo(options: YoloOptions, outputs: tuple[TensorInfo, ...]) -> None:
    """Each output must be a grid [1, C, H, W] with C = A * (coordinate_size + 1 + num_classes).

    A (anchors per cell) is the length of the output's anchor mask when masks are given
    (looked up as `side<W>`, then `side<H>`); with anchors but no masks the anchors are
    shared equally by the outputs (3 per cell for YOLOv3/v4/v5); with neither the head is
    anchor-free (YOLOv6/v8 exported for depthai 2.x, one prediction per cell).
    """
    anchors, masks = options.anchors, options.anchor_masks
    if len(anchors) % 2:
        raise IncompatibleModel(f"anchors has {len(anchors)} numbers; it holds (w, h) pairs")
    pairs = len(anchors) // 2
    if masks and not anchors:
        raise IncompatibleModel("anchor_masks are given but anchors is empty")
    for side, mask in sorted(masks.items()):
        bad = [i for i in mask if not 0 <= i < pairs]
        if bad:
            raise IncompatibleModel(
                f"anchor_masks[{side!r}] refers to anchor {bad[0]}; there are {pairs} anchors"
            )
    per_cell = 1
    if anchors and not masks:
        per_cell, rest = divmod(pairs, len(outputs))
        if rest or not per_cell:
            raise IncompatibleModel(
                f"{pairs} anchors cannot be shared by {len(outputs)} outputs; give anchor_masks"
            )
    fields = options.coordinate_size + 1 + options.num_classes
    for tensor in outputs:
        dims = tensor.dims
        if len(dims) != 4 or dims[0] != 1:
            raise IncompatibleModel(
                f"output {tensor.name!r} is {_shape(tensor)}; depthai 2.x decodes YOLO on the "
                "device only from per-scale grids [1, C, H, W] (export with grid outputs, or "
                "deploy the blob as Generic)"
            )
        channels, height, width = dims[1:]
        if masks:
            key = f"side{width}" if f"side{width}" in masks else f"side{height}"
            if key not in masks:
                raise IncompatibleModel(
                    f"anchor_masks has no entry for output {tensor.name!r} "
                    f"({height}x{width} grid); expected key 'side{width}'"
                )
            per_cell = len(masks[key])
        if channels != per_cell * fields:
            raise IncompatibleModel(
                f"output {tensor.name!r} has {channels} channels; {per_cell} anchor(s) per cell "
                f"x ({options.coordinate_size} coordinates + 1 + {options.num_classes} classes) "
                f"= {per_cell * fields}{_classes_hint(channels, per_cell, options)}"
            )


def _classes_hint(channels: int, per_cell: int, options: YoloOptions) -> str:
    fields = options.coordinate_size + 1 + options.num_classes
    anchors = channels // fields
    if not options.anchors and anchors > 1 and channels == anchors * fields:
        return (
            f" (this blob has {anchors} anchors per cell: give anchors and anchor_masks, "
            "as the REST API did for YOLOv3/v4/v5)"
        )
    classes = channels / per_cell - options.coordinate_size - 1
    if classes >= 1 and math.isclose(classes, round(classes)):
        return f" (this blob looks like num_classes={round(classes)})"
    return ""
