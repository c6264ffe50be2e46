"""Build the depthai 2.x pipeline that runs a camera's NN set; pure, no device needed.

Image paths, per stream:
- `CAM_X`, colour sensor: ColorCamera preview at the blob's W x H, planar BGR. A 1-channel
  blob, or a second NN on the same sensor, gets an ImageManip after the preview.
- `CAM_X`, mono sensor: MonoCamera -> ImageManip to BGR888p (GRAY8 for a 1-channel blob) at
  the blob's W x H, stretched over the whole frame.
- `DEPTH_X_Y`: StereoDepth over sockets X (left) and Y, depth aligned to X. The NN sees X's
  image built as above, so detections and depth share one frame; YOLO and MobileNet become
  their spatial variants (coordinates in mm). A Generic NN there runs on X's image with no
  StereoDepth built: depthai 2.x has no generic spatial node, and raw layers carry no boxes
  to attach depth to.

Each NN sends its output on an XLinkOut named `xlink_name(stream)`; a SystemLogger sends
the chip's temperatures, memory use and CPU load on `SYSINFO_XLINK` once every
`SYSINFO_SECONDS` (a few hundred bytes: a negligible cost on the device and the link).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import depthai as dai

from agent.messages import MobileNetConfig, YoloConfig
from agent.topics import is_depth_stream

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.cameras.base import Deployment
    from agent.cameras.features import CameraFeatures, Sensor

__all__ = ["SYSINFO_SECONDS", "SYSINFO_XLINK", "build_pipeline", "stream_of", "xlink_name"]

_XLINK_PREFIX: Final = "nn_"
SYSINFO_XLINK: Final = "sysinfo"  # no stream's name: those start with `nn_`
SYSINFO_SECONDS: Final = 5.0
# NN inputs keep only the newest frame: a slow NN must not stall the sensor or StereoDepth
_NN_QUEUE: Final = 1
# average depth over the middle half of each box, so background pixels at its edges count less
_BBOX_SCALE: Final = 0.5

_COLOR_RESOLUTIONS: Final = {
    720: dai.ColorCameraProperties.SensorResolution.THE_720_P,
    800: dai.ColorCameraProperties.SensorResolution.THE_800_P,
    1200: dai.ColorCameraProperties.SensorResolution.THE_1200_P,
}
_MONO_RESOLUTIONS: Final = {
    480: dai.MonoCameraProperties.SensorResolution.THE_480_P,
    720: dai.MonoCameraProperties.SensorResolution.THE_720_P,
    # 1280x800 sensors (OV9282) run binned at 640x400: the usual stereo setting, 4x less work
    800: dai.MonoCameraProperties.SensorResolution.THE_400_P,
    1200: dai.MonoCameraProperties.SensorResolution.THE_1200_P,
}


def xlink_name(stream: str) -> str:
    """The XLinkOut stream carrying the output of the NN on `stream`."""
    return _XLINK_PREFIX + stream


def stream_of(xlink: str) -> str:
    """The agent stream an XLinkOut name belongs to."""
    return xlink.removeprefix(_XLINK_PREFIX)


def build_pipeline(features: CameraFeatures, nn_set: Mapping[str, Deployment]) -> dai.Pipeline:
    """A pipeline running every NN in `nn_set`; raise KeyError for a stream the camera lacks."""
    builder = _Builder(features, nn_set)
    for stream in sorted(nn_set):  # CAM_* before DEPTH_*: plain streams get the preview
        builder.add(stream, nn_set[stream])
    builder.system_logger()
    return builder.pipeline


@dataclass(frozen=True, slots=True)
class _Input:
    width: int
    height: int
    channels: int


def _input(deployment: Deployment) -> _Input:
    # pre-flight guarantees one image input [1, C, H, W]
    _, channels, height, width = deployment.model.info.inputs[0].dims
    return _Input(width, height, channels)


def _socket(name: str) -> dai.CameraBoardSocket:
    socket: dai.CameraBoardSocket = getattr(dai.CameraBoardSocket, name)
    return socket


class _Builder:
    def __init__(self, features: CameraFeatures, nn_set: Mapping[str, Deployment]) -> None:
        self.pipeline = dai.Pipeline()
        self._features = features
        self._cameras: dict[str, Any] = {}  # socket -> ColorCamera | MonoCamera
        self._preview: dict[str, _Input] = {}  # colour socket -> preview size in use
        # a colour preview that also feeds depth covers the full frame, like the depth map
        self._stretch = {features.pair(s)[0] for s in nn_set if is_depth_stream(s)}

    def add(self, stream: str, deployment: Deployment) -> None:
        depth = is_depth_stream(stream)
        socket = self._features.image_socket(stream)
        if socket not in self._features.sensors:
            raise KeyError(stream)
        nn = self._network(deployment, spatial=depth)
        nn.setBlobPath(str(deployment.model.path))
        nn.setNumInferenceThreads(deployment.nn_config.num_inference_threads)
        nn.input.setBlocking(False)
        nn.input.setQueueSize(_NN_QUEUE)
        self._image(socket, _input(deployment)).link(nn.input)
        if depth and isinstance(deployment.nn_config, YoloConfig | MobileNetConfig):
            self._stereo(stream).depth.link(nn.inputDepth)
        xout = self.pipeline.create(dai.node.XLinkOut)
        xout.setStreamName(xlink_name(stream))
        nn.out.link(xout.input)

    def system_logger(self) -> None:
        logger = self.pipeline.create(dai.node.SystemLogger)
        logger.setRate(1.0 / SYSINFO_SECONDS)
        xout = self.pipeline.create(dai.node.XLinkOut)
        xout.setStreamName(SYSINFO_XLINK)
        logger.out.link(xout.input)

    def _network(self, deployment: Deployment, *, spatial: bool) -> Any:
        config = deployment.nn_config
        node: Any
        if isinstance(config, YoloConfig):
            node = self.pipeline.create(
                dai.node.YoloSpatialDetectionNetwork if spatial else dai.node.YoloDetectionNetwork
            )
            options = config.nn_config
            node.setNumClasses(options.num_classes)
            node.setCoordinateSize(options.coordinate_size)
            node.setAnchors(list(options.anchors))
            node.setAnchorMasks({side: list(mask) for side, mask in options.anchor_masks.items()})
            node.setIouThreshold(options.iou_threshold)
            node.setConfidenceThreshold(options.confidence_threshold)
        elif isinstance(config, MobileNetConfig):
            node = self.pipeline.create(
                dai.node.MobileNetSpatialDetectionNetwork
                if spatial
                else dai.node.MobileNetDetectionNetwork
            )
            node.setConfidenceThreshold(config.nn_config.confidence_threshold)
        else:
            return self.pipeline.create(dai.node.NeuralNetwork)
        if spatial:
            node.setBoundingBoxScaleFactor(_BBOX_SCALE)
        return node

    def _camera(self, socket: str) -> Any:
        camera = self._cameras.get(socket)
        if camera is not None:
            return camera
        sensor = self._features.sensors[socket]
        if sensor.kind == "color":
            camera = self.pipeline.create(dai.node.ColorCamera)
            resolution = _color_resolution(sensor)
            camera.setInterleaved(False)
            camera.setColorOrder(dai.ColorCameraProperties.ColorOrder.BGR)
            camera.setPreviewKeepAspectRatio(socket not in self._stretch)
        else:
            camera = self.pipeline.create(dai.node.MonoCamera)
            resolution = _MONO_RESOLUTIONS.get(sensor.height)
        camera.setBoardSocket(_socket(socket))
        if resolution is not None:
            camera.setResolution(resolution)
        self._cameras[socket] = camera
        return camera

    def _image(self, socket: str, size: _Input) -> Any:
        """An output carrying `socket`'s frames as the blob takes them."""
        camera = self._camera(socket)
        if self._features.sensors[socket].kind == "mono":
            return self._manip(camera.out, size)
        preview = self._preview.get(socket)
        if preview is None:
            camera.setPreviewSize(size.width, size.height)
            self._preview[socket] = preview = _Input(size.width, size.height, 3)
        if preview == size:
            return camera.preview
        return self._manip(camera.preview, size)

    def _manip(self, source: Any, size: _Input) -> Any:
        manip = self.pipeline.create(dai.node.ImageManip)
        manip.initialConfig.setResize(size.width, size.height)
        manip.initialConfig.setKeepAspectRatio(False)  # the whole frame, as depth sees it
        manip.initialConfig.setFrameType(
            dai.ImgFrame.Type.GRAY8 if size.channels == 1 else dai.ImgFrame.Type.BGR888p
        )
        manip.setMaxOutputFrameSize(size.width * size.height * size.channels)
        manip.inputImage.setBlocking(False)
        manip.inputImage.setQueueSize(_NN_QUEUE)
        source.link(manip.inputImage)
        return manip.out

    def _stereo(self, stream: str) -> Any:
        left, right = self._features.pair(stream)
        stereo = self.pipeline.create(dai.node.StereoDepth)
        stereo.setDefaultProfilePreset(dai.node.StereoDepth.PresetMode.DEFAULT)
        stereo.setLeftRightCheck(True)  # required for aligning depth to a camera socket
        stereo.setDepthAlign(_socket(left))
        for socket, port in ((left, stereo.left), (right, stereo.right)):
            camera = self._camera(socket)
            # StereoDepth reads the luma plane of a colour sensor's ISP output
            mono = self._features.sensors[socket].kind == "mono"
            (camera.out if mono else camera.isp).link(port)
        return stereo


def _color_resolution(sensor: Sensor) -> Any:
    resolution = _COLOR_RESOLUTIONS.get(sensor.height)
    if resolution is None and sensor.height >= 1080:
        # larger sensors run at 1080p: the preview is downscaled from it anyway
        return dai.ColorCameraProperties.SensorResolution.THE_1080_P
    return resolution
