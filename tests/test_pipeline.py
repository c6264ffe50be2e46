"""The depthai pipeline builder, checked through `Pipeline.serializeToJson()` (no device)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import depthai as dai
import pytest

from agent.cameras.base import Deployment
from agent.cameras.features import CameraFeatures, Sensor
from agent.cameras.pipeline import (
    SYSINFO_SECONDS,
    SYSINFO_XLINK,
    build_pipeline,
    stream_of,
    xlink_name,
)
from agent.messages import (
    GenericConfig,
    MobileNetConfig,
    MobileNetOptions,
    NNConfig,
    YoloConfig,
    YoloOptions,
)
from agent.models import StoredModel, parse_blob

BLOBS: Final = Path(__file__).parent / "data" / "blobs"
# an OAK-D: colour IMX378 on CAM_A, OV9282 mono pair on CAM_B/CAM_C
OAK_D: Final = CameraFeatures(
    {
        "CAM_A": Sensor("color", 4056, 3040),
        "CAM_B": Sensor("mono", 1280, 800),
        "CAM_C": Sensor("mono", 1280, 800),
    },
    stereo=(("CAM_B", "CAM_C"),),
)
# an OAK-D-SR: two OV9782 colour sensors as the stereo pair
OAK_D_SR: Final = CameraFeatures(
    {"CAM_B": Sensor("color", 1280, 800), "CAM_C": Sensor("color", 1280, 800)},
    stereo=(("CAM_B", "CAM_C"),),
)
YOLO_ANCHORS: Final = (10.0, 14.0, 23.0, 27.0, 37.0, 58.0, 81.0, 82.0, 135.0, 169.0, 344.0, 319.0)
YOLO_MASKS: Final[dict[str, tuple[int, ...]]] = {"side26": (1, 2, 3), "side13": (3, 4, 5)}

BGR888P: Final = int(dai.ImgFrame.Type.BGR888p)
GRAY8: Final = int(dai.ImgFrame.Type.GRAY8)


def model(name: str) -> StoredModel:
    path = BLOBS / name
    data = path.read_bytes()
    return StoredModel(hashlib.sha256(data).hexdigest(), len(data), path, parse_blob(path))


def yolo(threads: int = 2) -> Deployment:
    options = YoloOptions(
        num_classes=80,
        coordinate_size=4,
        anchors=YOLO_ANCHORS,
        anchor_masks=YOLO_MASKS,
        iou_threshold=0.45,
        confidence_threshold=0.3,
    )
    config = YoloConfig(nn_config=options, num_inference_threads=threads)
    return Deployment(model("yolo_tiny.blob"), config)


def mobilenet() -> Deployment:
    config = MobileNetConfig(nn_config=MobileNetOptions(confidence_threshold=0.6))
    return Deployment(model("ssd_tiny.blob"), config, labels=("background", "person"))


def generic(blob: str = "gray_tiny.blob", threads: int = 1) -> Deployment:
    config: NNConfig = GenericConfig(num_inference_threads=threads)
    return Deployment(model(blob), config)


@dataclass(frozen=True)
class Node:
    id: int
    name: str
    props: dict[str, Any]
    io: dict[str, Any]


class Graph:
    """The serialised pipeline: nodes by id and links as (from, output, to, input)."""

    def __init__(self, pipeline: dai.Pipeline) -> None:
        data = pipeline.serializeToJson()["pipeline"]
        self.nodes = {
            i: Node(i, n["name"], n["properties"], {name: io for (_, name), io in n["ioInfo"]})
            for i, n in data["nodes"]
        }
        self.links = {
            (c["node1Id"], c["node1Output"], c["node2Id"], c["node2Input"])
            for c in data["connections"]
        }

    def all(self, name: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.name == name]

    def one(self, name: str) -> Node:
        (node,) = self.all(name)
        return node

    def source(self, node: Node, input_name: str) -> tuple[Node, str]:
        (found,) = [
            (self.nodes[a], out) for a, out, b, i in self.links if (b, i) == (node.id, input_name)
        ]
        return found

    def targets(self, node: Node, output: str) -> list[tuple[Node, str]]:
        return [(self.nodes[b], i) for a, out, b, i in self.links if (a, out) == (node.id, output)]

    def nn_of(self, stream: str) -> Node:
        (xout,) = [n for n in self.all("XLinkOut") if n.props["streamName"] == xlink_name(stream)]
        nn, output = self.source(xout, "in")
        assert output == "out"
        return nn


def graph(features: CameraFeatures, nn_set: dict[str, Deployment]) -> Graph:
    return Graph(build_pipeline(features, nn_set))


def socket(name: str) -> int:
    return int(getattr(dai.CameraBoardSocket, name))


def assert_manip(node: Node, *, width: int, height: int, frame_type: int, channels: int) -> None:
    assert node.name == "ImageManip"
    config = node.props["initialConfig"]
    assert config["formatConfig"]["type"] == frame_type
    resize = config["resizeConfig"]
    assert (resize["width"], resize["height"]) == (width, height)
    assert resize["keepAspectRatio"] is False
    assert node.props["outputFrameSize"] == width * height * channels


# --- plain colour and mono streams -------------------------------------------------------------


def test_yolo_on_colour_sensor_uses_planar_bgr_preview() -> None:
    g = graph(OAK_D, {"CAM_A": yolo()})
    nn = g.nn_of("CAM_A")
    assert nn.name == "DetectionNetwork"
    parser = nn.props["parser"]
    assert parser["nnFamily"] == 0
    assert parser["classes"] == 80
    assert parser["coordinates"] == 4
    assert parser["anchors"] == pytest.approx(list(YOLO_ANCHORS))
    assert parser["anchorMasks"] == {side: list(mask) for side, mask in YOLO_MASKS.items()}
    assert parser["iouThreshold"] == pytest.approx(0.45)
    assert parser["confidenceThreshold"] == pytest.approx(0.3)
    assert nn.props["numThreads"] == 2
    assert nn.props["blobSize"] == (BLOBS / "yolo_tiny.blob").stat().st_size
    camera, output = g.source(nn, "in")
    assert (camera.name, output) == ("ColorCamera", "preview")
    props = camera.props
    assert props["boardSocket"] == socket("CAM_A")
    assert (props["previewWidth"], props["previewHeight"]) == (416, 416)
    assert props["interleaved"] is False
    assert props["colorOrder"] == int(dai.ColorCameraProperties.ColorOrder.BGR)
    assert props["previewKeepAspectRatio"] is True
    assert props["resolution"] == int(dai.ColorCameraProperties.SensorResolution.THE_1080_P)
    assert g.all("StereoDepth") == []


def test_mobilenet_on_mono_sensor_converts_to_bgr() -> None:
    g = graph(OAK_D, {"CAM_B": mobilenet()})
    nn = g.nn_of("CAM_B")
    assert nn.name == "DetectionNetwork"
    assert nn.props["parser"]["nnFamily"] == 1
    assert nn.props["parser"]["confidenceThreshold"] == pytest.approx(0.6)
    manip, output = g.source(nn, "in")
    assert output == "out"
    assert_manip(manip, width=300, height=300, frame_type=BGR888P, channels=3)
    mono, output = g.source(manip, "inputImage")
    assert (mono.name, output) == ("MonoCamera", "out")
    assert mono.props["boardSocket"] == socket("CAM_B")
    assert mono.props["resolution"] == int(dai.MonoCameraProperties.SensorResolution.THE_400_P)


def test_generic_on_mono_sensor_keeps_gray8() -> None:
    g = graph(OAK_D, {"CAM_C": generic(threads=1)})
    nn = g.nn_of("CAM_C")
    assert nn.name == "NeuralNetwork"
    assert nn.props["numThreads"] == 1
    manip, _ = g.source(nn, "in")
    assert_manip(manip, width=64, height=64, frame_type=GRAY8, channels=1)
    mono, _ = g.source(manip, "inputImage")
    assert mono.props["boardSocket"] == socket("CAM_C")


def test_one_channel_blob_on_colour_sensor_gets_gray8_not_raw_preview() -> None:
    g = graph(OAK_D, {"CAM_A": generic()})
    nn = g.nn_of("CAM_A")
    manip, _ = g.source(nn, "in")
    assert_manip(manip, width=64, height=64, frame_type=GRAY8, channels=1)
    camera, output = g.source(manip, "inputImage")
    assert (camera.name, output) == ("ColorCamera", "preview")
    assert (camera.props["previewWidth"], camera.props["previewHeight"]) == (64, 64)


def test_nn_inputs_never_block_the_camera() -> None:
    g = graph(OAK_D, {"CAM_A": yolo(), "CAM_B": mobilenet()})
    manip, _ = g.source(g.nn_of("CAM_B"), "in")
    for node, port in ((g.nn_of("CAM_A"), "in"), (g.nn_of("CAM_B"), "in"), (manip, "inputImage")):
        assert node.io[port]["blocking"] is False
        assert node.io[port]["queueSize"] == 1


# --- DEPTH streams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deployment", "family"), [(yolo, 0), (mobilenet, 1)], ids=["yolo", "mobilenet"]
)
def test_detector_on_depth_stream_is_spatial_and_aligned_to_left(
    deployment: Any, family: int
) -> None:
    g = graph(OAK_D, {"DEPTH_B_C": deployment()})
    nn = g.nn_of("DEPTH_B_C")
    assert nn.name == "SpatialDetectionNetwork"
    assert nn.props["parser"]["nnFamily"] == family
    assert nn.props["detectedBBScaleFactor"] == pytest.approx(0.5)
    stereo = g.one("StereoDepth")
    assert stereo.props["depthAlignCamera"] == socket("CAM_B")
    assert g.source(nn, "inputDepth") == (stereo, "depth")
    left, _ = g.source(stereo, "left")
    right, _ = g.source(stereo, "right")
    assert (left.props["boardSocket"], right.props["boardSocket"]) == (
        socket("CAM_B"),
        socket("CAM_C"),
    )
    # the NN's image comes from the left sensor, through the same MonoCamera node
    manip, _ = g.source(nn, "in")
    assert g.source(manip, "inputImage") == (left, "out")
    assert len(g.all("MonoCamera")) == 2


def test_yolo_options_survive_the_spatial_variant() -> None:
    parser = graph(OAK_D, {"DEPTH_B_C": yolo()}).nn_of("DEPTH_B_C").props["parser"]
    assert parser["classes"] == 80
    assert parser["anchorMasks"] == {side: list(mask) for side, mask in YOLO_MASKS.items()}
    assert parser["iouThreshold"] == pytest.approx(0.45)


def test_generic_on_depth_stream_runs_on_left_image_without_depth() -> None:
    g = graph(OAK_D, {"DEPTH_B_C": generic()})
    nn = g.nn_of("DEPTH_B_C")
    assert nn.name == "NeuralNetwork"
    assert g.all("StereoDepth") == []
    manip, _ = g.source(nn, "in")
    mono, _ = g.source(manip, "inputImage")
    assert mono.props["boardSocket"] == socket("CAM_B")


def test_colour_stereo_pair_feeds_isp_and_stretches_the_preview() -> None:
    g = graph(OAK_D_SR, {"DEPTH_B_C": yolo()})
    stereo = g.one("StereoDepth")
    left, output = g.source(stereo, "left")
    assert (left.name, output) == ("ColorCamera", "isp")
    assert left.props["resolution"] == int(dai.ColorCameraProperties.SensorResolution.THE_800_P)
    nn = g.nn_of("DEPTH_B_C")
    assert g.source(nn, "in") == (left, "preview")
    # depth covers the full frame, so the NN must too
    assert left.props["previewKeepAspectRatio"] is False


# --- several NNs on one camera ------------------------------------------------------------------


def test_two_streams_share_one_camera_node_per_socket() -> None:
    g = graph(OAK_D, {"CAM_B": generic(), "DEPTH_B_C": yolo()})
    monos = {n.props["boardSocket"]: n for n in g.all("MonoCamera")}
    assert sorted(monos) == [socket("CAM_B"), socket("CAM_C")]
    left = monos[socket("CAM_B")]
    manips = [node for node, _ in g.targets(left, "out") if node.name == "ImageManip"]
    assert len(manips) == 2
    assert {n.props["streamName"] for n in g.all("XLinkOut")} == {
        "nn_CAM_B",
        "nn_DEPTH_B_C",
        SYSINFO_XLINK,
    }
    gray, _ = g.source(g.nn_of("CAM_B"), "in")
    bgr, _ = g.source(g.nn_of("DEPTH_B_C"), "in")
    assert_manip(gray, width=64, height=64, frame_type=GRAY8, channels=1)
    assert_manip(bgr, width=416, height=416, frame_type=BGR888P, channels=3)


def test_second_nn_on_a_colour_sensor_resizes_the_preview() -> None:
    g = graph(OAK_D_SR, {"CAM_B": yolo(), "DEPTH_B_C": mobilenet()})
    (camera,) = [n for n in g.all("ColorCamera") if n.props["boardSocket"] == socket("CAM_B")]
    assert (camera.props["previewWidth"], camera.props["previewHeight"]) == (416, 416)
    assert g.source(g.nn_of("CAM_B"), "in") == (camera, "preview")
    manip, _ = g.source(g.nn_of("DEPTH_B_C"), "in")
    assert_manip(manip, width=300, height=300, frame_type=BGR888P, channels=3)
    assert g.source(manip, "inputImage") == (camera, "preview")


def test_three_nns_on_an_oak_d() -> None:
    g = graph(OAK_D, {"CAM_A": yolo(), "CAM_C": mobilenet(), "DEPTH_B_C": yolo()})
    assert len(g.all("ColorCamera")) == 1
    assert len(g.all("MonoCamera")) == 2
    assert len(g.all("StereoDepth")) == 1
    names = sorted(n.props["streamName"] for n in g.all("XLinkOut"))
    assert names == ["nn_CAM_A", "nn_CAM_C", "nn_DEPTH_B_C", SYSINFO_XLINK]


def test_downloaded_three_channel_blob_on_mono_sensor() -> None:
    from tests.blobcache import BlobFetchError, fetch_blobs  # noqa: PLC0415 - only this test downloads

    try:
        path = fetch_blobs()["Laplacian_3x3_shaves4"]
    except BlobFetchError as exc:
        pytest.skip(f"test blobs unavailable: {exc}")
    data = path.read_bytes()
    stored = StoredModel(hashlib.sha256(data).hexdigest(), len(data), path, parse_blob(path))
    g = graph(OAK_D, {"CAM_B": Deployment(stored, GenericConfig())})
    manip, _ = g.source(g.nn_of("CAM_B"), "in")
    assert_manip(manip, width=640, height=480, frame_type=BGR888P, channels=3)


# --- names and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["CAM_A", "DEPTH_B_C"])
def test_xlink_names_round_trip(stream: str) -> None:
    assert stream_of(xlink_name(stream)) == stream


def test_unknown_stream_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        build_pipeline(OAK_D, {"CAM_D": yolo()})
    with pytest.raises(KeyError):
        build_pipeline(OAK_D, {"DEPTH_A_B": yolo()})


def test_features_list_streams_like_the_simulator() -> None:
    assert OAK_D.streams == ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")


@pytest.mark.parametrize(
    "nn_set",
    [
        pytest.param(lambda: {"CAM_A": yolo()}, id="one NN"),
        pytest.param(lambda: {"CAM_A": yolo(), "DEPTH_B_C": mobilenet()}, id="two NNs"),
    ],
)
def test_one_system_logger_reports_on_its_own_xlink_at_a_low_rate(nn_set: Any) -> None:
    g = graph(OAK_D, nn_set())
    logger = g.one("SystemLogger")
    assert logger.props["rateHz"] == pytest.approx(1.0 / SYSINFO_SECONDS)
    assert logger.props["rateHz"] <= 1.0  # a report at most every second: negligible load
    ((xout, port),) = g.targets(logger, "out")
    assert (xout.name, port, xout.props["streamName"]) == ("XLinkOut", "in", SYSINFO_XLINK)
    # its link is not mistaken for a stream's
    assert not SYSINFO_XLINK.startswith(xlink_name(""))
