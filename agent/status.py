"""What a camera looks like from outside: its status, each stream's NN status, its routes.

Pure functions of the camera's slots and state; the worker publishes what they return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.messages import (
    CameraStatus,
    MobileNetConfig,
    ModelRef,
    NNStatus,
    NNSummary,
    OutputOptions,
    YoloConfig,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from agent.cameras.base import Camera, Deployment
    from agent.errors import ErrorInfo
    from agent.lifecycle import Slot, Slots
    from agent.messages import NNConfig
    from agent.topics import Topics
    from agent.vocab import CameraStateName, NNStateName

__all__ = ["Route", "camera_status", "nn_status", "nn_statuses", "routes"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where and how the output of one running NN is published."""

    topic: str
    model_sha256: str
    type: str
    labels: tuple[str, ...] | None
    output: OutputOptions = field(default_factory=OutputOptions)
    # where counts go: detector networks only (Generic ones have no labels to count)
    counts_topic: str | None = None


def nn_status(slot: Slot | None) -> NNStatus:
    """One stream's NN: deploying what is queued or applying, else what runs or failed."""
    if slot is None:
        return NNStatus(state="none")
    request = slot.queued or slot.applying
    if request is not None and request.deployment is not None:
        return _status("deploying", request.deployment, request.id)
    error = slot.failure.error if slot.failure else None
    if slot.running is not None:
        return _status("running", slot.running, slot.running.request_id, error)
    if slot.failure is not None:
        failed = slot.failure.request
        if failed.deployment is not None:
            return _status("failed", failed.deployment, failed.id, error)
        return NNStatus(state="failed", request_id=failed.id, error=error)
    return NNStatus(state="none")


def nn_statuses(streams: Iterable[str], slots: Slots) -> dict[str, NNStatus]:
    return {stream: nn_status(slots.get(stream)) for stream in streams}


def camera_status(
    camera: Camera,
    state: CameraStateName,
    nn: Mapping[str, NNStatus],
    *,
    restarts: int,
    last_error: ErrorInfo | None,
) -> CameraStatus:
    """The camera's retained status, with a summary of each stream's `nn` status."""
    return CameraStatus(
        state=state,
        name=camera.name,
        streams=camera.streams,
        nn={stream: _summary(status) for stream, status in nn.items()},
        restarts=restarts,
        last_error=last_error,
    )


def routes(
    topics: Topics, camera: str, state: CameraStateName, running: Mapping[str, Deployment]
) -> dict[str, Route]:
    """Where each running NN's output goes: nowhere unless the camera is online."""
    if state != "online":
        return {}
    return {
        stream: Route(
            topic=topics.detections(camera, stream),
            model_sha256=deployment.model.sha256,
            type=_type(deployment.nn_config),
            labels=deployment.labels,
            output=deployment.output,
            counts_topic=topics.counts(camera, stream)
            if isinstance(deployment.nn_config, YoloConfig | MobileNetConfig)
            else None,
        )
        for stream, deployment in running.items()
    }


def _type(nn_config: NNConfig) -> str:
    return str(type(nn_config).__struct_config__.tag)


def _summary(status: NNStatus) -> NNSummary:
    return NNSummary(
        state=status.state,
        type=_type(status.nn_config) if status.nn_config is not None else None,
        model_sha256=status.model.sha256 if status.model else None,
        model_name=status.model.name if status.model else None,
    )


def _status(
    state: NNStateName,
    deployment: Deployment,
    request_id: str,
    error: ErrorInfo | None = None,
) -> NNStatus:
    return NNStatus(
        state=state,
        model=ModelRef(
            sha256=deployment.model.sha256,
            size=deployment.model.size,
            name=deployment.model_name,
        ),
        nn_config=deployment.nn_config,
        labels=deployment.labels,
        request_id=request_id,
        error=error,
        output=deployment.output,
    )
