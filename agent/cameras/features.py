"""What a camera can feed an NN: its sensors and stereo pairs, and the streams they make."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.topics import is_depth_stream

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.config import SensorKind

__all__ = ["CameraFeatures", "Sensor"]


@dataclass(frozen=True, slots=True)
class Sensor:
    kind: SensorKind
    # native size; 0 when unknown, and then depthai's default resolution is used
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class CameraFeatures:
    """Sensors by socket (`CAM_A`..`CAM_H`) and stereo pairs as (left, right) sockets."""

    sensors: Mapping[str, Sensor]
    stereo: tuple[tuple[str, str], ...] = ()
    streams: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        depth = [f"DEPTH_{left[-1]}_{right[-1]}" for left, right in self.stereo]
        object.__setattr__(self, "streams", (*sorted(self.sensors), *depth))

    def pair(self, stream: str) -> tuple[str, str]:
        """The (left, right) sockets of a `DEPTH_X_Y` stream; KeyError when it has none."""
        for left, right in self.stereo:
            if stream == f"DEPTH_{left[-1]}_{right[-1]}":
                return left, right
        raise KeyError(stream)

    def image_socket(self, stream: str) -> str:
        """The socket whose frames an NN on `stream` sees: the left one for DEPTH streams."""
        return self.pair(stream)[0] if is_depth_stream(stream) else stream
