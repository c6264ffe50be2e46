"""The camera backend Protocol and the vocabulary both backends share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from agent.messages import DeviceMemory, LeonCpu, OutputOptions, Temperatures

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from anyio.abc import TaskStatus

    from agent.cameras.features import CameraFeatures
    from agent.messages import CameraStats, NNConfig
    from agent.models import StoredModel

__all__ = [
    "Camera",
    "CameraBackend",
    "CameraListener",
    "Deployment",
    "DeviceHealth",
    "NNSet",
    "Output",
    "RawLayer",
]


@dataclass(frozen=True, slots=True)
class Deployment:
    """One NN on one stream: a stored model and how to run it."""

    model: StoredModel
    nn_config: NNConfig
    labels: tuple[str, ...] | None = None
    model_name: str | None = None
    request_id: str = ""
    output: OutputOptions = field(default_factory=OutputOptions)

    def same_network(self, other: Deployment | None) -> bool:
        """True when running `other` instead needs no restart (labels and output are
        host-side only)."""
        return (
            other is not None
            and other.model.sha256 == self.model.sha256
            and other.nn_config == self.nn_config
        )


NNSet = Mapping[str, Deployment]


@dataclass(frozen=True, slots=True)
class RawLayer:
    name: str
    dims: tuple[int, ...]
    dtype: str
    data: npt.NDArray[np.generic]


@dataclass(frozen=True, slots=True)
class Output:
    """One NN result as a backend produced it, before it is encoded for the wire.

    `detections` rows are `label, confidence, xmin, ymin, xmax, ymax` and, on DEPTH
    streams, `x, y, z` in millimetres; Generic networks fill `layers` instead.
    """

    camera: str
    stream: str
    seq: int
    device_ts: float
    detections: npt.NDArray[np.float32] | None = None
    layers: tuple[RawLayer, ...] | None = None


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """What a camera reports about itself; device fields stay unknown until it reports them
    (a real OAK only while it runs a pipeline: its SystemLogger is part of it)."""

    uptime: float | None = None  # seconds since the device last booted
    temperature: Temperatures = field(default_factory=Temperatures)
    memory: DeviceMemory = field(default_factory=DeviceMemory)
    leon_cpu: LeonCpu = field(default_factory=LeonCpu)
    # per stream: results dropped before the agent read them, since it started
    dropped: Mapping[str, int] = field(default_factory=dict)


class CameraListener(Protocol):
    """What a backend reports to; called on the event loop thread only."""

    def on_output(self, output: Output) -> None:
        """A result arrived; must not block (it may drop and count)."""

    def on_presence(self, camera: str, present: bool) -> None:
        """A camera appeared or disappeared."""


class Camera(Protocol):
    @property
    def mxid(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def product(self) -> str:
        """The product name the device reports (e.g. "OAK-D-LITE"); for dashboards."""

    @property
    def firmware(self) -> str | None:
        """The device's bootloader version where known; for dashboards."""

    @property
    def features(self) -> CameraFeatures:
        """The sensors and stereo pairs an NN can be fed from."""

    @property
    def streams(self) -> tuple[str, ...]:
        """`features.streams`: the streams an NN can be deployed to."""

    @property
    def present(self) -> bool: ...

    @property
    def stats(self) -> CameraStats:
        """The camera's counters as they stand now (cheap: read on every status publish)."""

    @property
    def health(self) -> DeviceHealth:
        """The device's latest health report (cheap: read on every stats publish)."""

    async def apply(self, nn_set: NNSet) -> None:
        """Restart the camera running exactly `nn_set`.

        Returns once every NN runs; raises DeployFailed or CameraOffline otherwise, after
        which the camera runs nothing until the next successful `apply`.
        """


class CameraBackend(Protocol):
    name: str

    @property
    def cameras(self) -> Mapping[str, Camera]:
        """Every camera this backend knows, present or not; may grow while running."""

    async def run(self, listener: CameraListener, *, task_status: TaskStatus[None]) -> None:
        """Discover and drive cameras until cancelled; `started()` once cameras are known."""
