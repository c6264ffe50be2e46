"""Pre-flight checks: what they accept, and each reason they refuse a model."""

from __future__ import annotations

import dataclasses
import itertools

import depthai as dai
import pytest

from agent.cameras.base import Deployment
from agent.cameras.features import CameraFeatures, Sensor
from agent.cameras.preflight import SUPPORTED_OPENVINO, blob_versions_compatible, check
from agent.cameras.simulator import SimulatedCamera
from agent.config import SimulatedCamera as CameraSpec
from agent.errors import IncompatibleModel, UnknownStream
from agent.messages import GenericConfig, MobileNetConfig, YoloConfig, YoloOptions
from agent.models import StoredModel, TensorInfo
from tests.test_pipeline import OAK_D, YOLO_ANCHORS, YOLO_MASKS, model


def yolo(blob: str = "yolo_tiny.blob", **options: object) -> Deployment:
    values: dict[str, object] = {
        "num_classes": 80,
        "anchors": YOLO_ANCHORS,
        "anchor_masks": YOLO_MASKS,
    }
    values.update(options)
    return Deployment(model(blob), YoloConfig(nn_config=YoloOptions(**values)))  # type: ignore[arg-type]


def mobilenet(blob: str = "ssd_tiny.blob") -> Deployment:
    return Deployment(model(blob), MobileNetConfig())


def generic(blob: str = "gray_tiny.blob") -> Deployment:
    return Deployment(model(blob), GenericConfig())


def altered(deployment: Deployment, **info: object) -> Deployment:
    """The deployment with its blob's parsed info changed (version, inputs, outputs)."""
    stored: StoredModel = deployment.model
    new_info = dataclasses.replace(stored.info, **info)  # type: ignore[arg-type]
    return dataclasses.replace(deployment, model=dataclasses.replace(stored, info=new_info))


def rejected(stream: str, deployment: Deployment, **kwargs: object) -> str:
    with pytest.raises(IncompatibleModel) as caught:
        check(OAK_D, stream, deployment, **kwargs)  # type: ignore[arg-type]
    return caught.value.message


# --- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["CAM_A", "CAM_B", "DEPTH_B_C"])
def test_every_type_is_accepted_on_every_stream_kind(stream: str) -> None:
    for deployment in (yolo(), mobilenet(), generic()):
        check(OAK_D, stream, deployment)


def test_yolo_with_the_blob_class_count_is_accepted() -> None:
    check(OAK_D, "CAM_A", yolo("yolo_tiny_c2.blob", num_classes=2))


def test_yolo_anchors_without_masks_are_shared_by_the_outputs() -> None:
    # 6 anchor pairs over 2 outputs: 3 per cell, as YOLOv3/v4-tiny
    check(OAK_D, "CAM_A", yolo(anchor_masks={}))


def test_anchor_free_yolo_has_one_prediction_per_cell() -> None:
    # YOLOv6/v8 exported for depthai 2.x: 4 + 1 + classes channels per grid cell
    check(OAK_D, "CAM_A", yolo("yolo_tiny_c2.blob", num_classes=16, anchors=(), anchor_masks={}))


def test_masks_may_be_keyed_by_grid_height() -> None:
    outputs = (
        TensorInfo("a", (1, 255, 20, 40), "float16"),
        TensorInfo("b", (1, 255, 10, 20), "float16"),
    )
    deployment = altered(
        yolo(anchor_masks={"side20": (0, 1, 2), "side10": (3, 4, 5)}), outputs=outputs
    )
    check(OAK_D, "CAM_A", deployment)


def test_compatible_versions_share_a_camera() -> None:
    other = altered(generic(), version="2021.4")
    check(OAK_D, "CAM_A", yolo(), others={"CAM_B": other})


# --- rejected: stream, version, input -----------------------------------------------------------


def test_unknown_stream() -> None:
    with pytest.raises(UnknownStream) as caught:
        check(OAK_D, "DEPTH_A_B", yolo(), camera="MXID")
    assert "has no stream 'DEPTH_A_B'" in caught.value.message
    assert "DEPTH_B_C" in caught.value.message


def test_unsupported_openvino_version() -> None:
    message = rejected("CAM_A", altered(yolo(), version="2023.3"))
    assert "OpenVINO 2023.3" in message


def test_version_incompatible_with_another_nn_on_the_camera() -> None:
    other = altered(generic(), version="2020.3")
    message = rejected("CAM_A", yolo(), others={"CAM_B": other})
    assert "NN on CAM_B is for 2020.3" in message


def test_an_nn_does_not_conflict_with_the_one_it_replaces() -> None:
    check(OAK_D, "CAM_A", yolo(), others={"CAM_A": altered(generic(), version="2020.3")})


def test_two_inputs() -> None:
    image = TensorInfo("image", (1, 3, 64, 64), "uint8")
    message = rejected("CAM_A", altered(generic(), inputs=(image, image)))
    assert "2 inputs" in message


@pytest.mark.parametrize(
    "dims",
    [(1, 4, 64, 64), (2, 3, 64, 64), (3, 64, 64), (1, 64, 64, 3)],
    ids=["four-channels", "batch-2", "three-d", "channels-last"],
)
def test_input_that_is_not_a_camera_image(dims: tuple[int, ...]) -> None:
    message = rejected("CAM_A", altered(generic(), inputs=(TensorInfo("x", dims, "uint8"),)))
    assert "[1, C, H, W]" in message
    assert str(list(dims)) in message


def test_float_input() -> None:
    message = rejected(
        "CAM_A", altered(generic(), inputs=(TensorInfo("x", (1, 3, 8, 8), "float16"),))
    )
    assert "-ip U8" in message


# --- rejected: YOLO -----------------------------------------------------------------------------


def test_yolo_wrong_class_count_names_the_blob_count() -> None:
    message = rejected("CAM_A", yolo("yolo_tiny_c2.blob", num_classes=80))
    assert "has 21 channels" in message
    assert "= 255" in message
    assert "num_classes=2" in message


def test_yolo_wrong_coordinate_size() -> None:
    message = rejected("CAM_A", yolo(coordinate_size=5))
    assert "5 coordinates" in message


def test_yolo_mask_missing_for_an_output() -> None:
    message = rejected("CAM_A", yolo(anchor_masks={"side52": (0, 1, 2), "side13": (3, 4, 5)}))
    assert "no entry for output 'yolo_26'" in message
    assert "'side26'" in message


def test_yolo_mask_refers_to_missing_anchor() -> None:
    message = rejected("CAM_A", yolo(anchor_masks={"side26": (1, 2, 6), "side13": (3, 4, 5)}))
    assert "refers to anchor 6; there are 6 anchors" in message


def test_yolo_odd_anchor_count() -> None:
    assert "(w, h) pairs" in rejected("CAM_A", yolo(anchors=YOLO_ANCHORS[:-1], anchor_masks={}))


def test_yolo_masks_without_anchors() -> None:
    assert "anchors is empty" in rejected("CAM_A", yolo(anchors=()))


def test_yolo_anchors_not_shared_evenly() -> None:
    assert "cannot be shared" in rejected("CAM_A", yolo(anchors=YOLO_ANCHORS[:10], anchor_masks={}))


def test_yolo_single_flat_output_is_not_decodable_on_device() -> None:
    flat = (TensorInfo("output0", (1, 2535, 85), "float16"),)
    message = rejected("CAM_A", altered(yolo(anchor_masks={}), outputs=flat))
    assert "[1, 2535, 85]" in message
    assert "Generic" in message


# --- rejected: MobileNet ------------------------------------------------------------------------


def test_mobilenet_with_two_outputs() -> None:
    message = rejected("CAM_A", mobilenet("yolo_tiny.blob"))
    assert "2 outputs (yolo_26, yolo_13)" in message


def test_mobilenet_output_not_detection_out() -> None:
    message = rejected("CAM_B", mobilenet("gray_tiny.blob"))
    assert "'features' is [1, 8, 32, 32]" in message


# --- kept in sync with depthai, and usable with the simulator -----------------------------------


def test_supported_versions_match_depthai() -> None:
    names = tuple(dai.OpenVINO.getVersionName(v) for v in dai.OpenVINO.getVersions())
    assert names == SUPPORTED_OPENVINO


def test_version_compatibility_matches_depthai() -> None:
    versions = dai.OpenVINO.getVersions()
    for a, b in itertools.product(versions, repeat=2):
        expected = dai.OpenVINO.areVersionsBlobCompatible(a, b)
        names = dai.OpenVINO.getVersionName(a), dai.OpenVINO.getVersionName(b)
        assert blob_versions_compatible(*names) == expected, names


def test_a_simulated_camera_has_the_features_of_its_spec() -> None:
    spec = CameraSpec(
        mxid="SIM1", sensors={"CAM_A": "color", "CAM_B": "mono"}, stereo=(("CAM_A", "CAM_B"),)
    )
    features = SimulatedCamera(spec).features
    assert features == CameraFeatures(
        {"CAM_A": Sensor("color"), "CAM_B": Sensor("mono")}, (("CAM_A", "CAM_B"),)
    )
    assert features.streams == SimulatedCamera(spec).streams == ("CAM_A", "CAM_B", "DEPTH_A_B")
    check(features, "DEPTH_A_B", yolo())
    with pytest.raises(UnknownStream):
        check(features, "CAM_C", generic())
