"""Requests and deployments made up for the pure tests of lifecycle and status (no blobs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cameras.base import Deployment
from agent.errors import DeployFailed, error_info
from agent.lifecycle import Slots
from agent.messages import MobileNetConfig
from agent.models import BlobInfo, StoredModel
from agent.requests import Request

if TYPE_CHECKING:
    from agent.requests import Notice
    from agent.vocab import RequestState

__all__ = ["FAILED", "delete", "deploy", "deployment", "model", "running", "states", "written"]

FAILED = error_info(DeployFailed("X_LINK_ERROR"))
_INFO = BlobInfo(version="2021.4", inputs=(), outputs=())


def model(name: str) -> StoredModel:
    sha = name.encode().hex().ljust(64, "0")
    return StoredModel(sha256=sha, size=len(name), path=Path(f"{sha}.blob"), info=_INFO)


def deployment(request_id: str, name: str = "a", **fields: Any) -> Deployment:
    """A MobileNet network on model `name`, unless `fields` say otherwise."""
    return Deployment(
        model=model(name), request_id=request_id, **{"nn_config": MobileNetConfig(), **fields}
    )


def deploy(request_id: str, stream: str = "CAM_A", name: str = "a", **fields: Any) -> Request:
    return Request(
        id=request_id,
        action="deploy",
        camera="C",
        stream=stream,
        deployment=deployment(request_id, name, **fields),
    )


def delete(request_id: str, stream: str = "CAM_A") -> Request:
    return Request(id=request_id, action="delete", camera="C", stream=stream)


def states(said: list[Notice]) -> list[tuple[str, RequestState]]:
    return [(notice.event.request_id, notice.event.state) for notice in said]


def written(slots: Slots, *requests: Request) -> list[tuple[str, RequestState]]:
    """Stage `requests` and have one state write record them; what it said."""
    for request in requests:
        slots.stage(request)
    said = states(slots.prepare())
    slots.commit()
    return said


def running(request_id: str = "old", name: str = "a") -> Slots:
    """The slots of a booted camera running model `name` on CAM_A."""
    slots = Slots()
    slots.booted = True
    slots.restore({"CAM_A": deployment(request_id, name)}, [])
    return slots
