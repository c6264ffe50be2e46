"""A rollout's record and its pure rules: which cameras, in which waves, when to abort.

The record (`Rollout`) is what the controller keeps retained on `{prefix}/rollouts/{id}`, so
that `fleet status` reads it from anywhere and `fleet deploy --resume` continues from it.
No I/O here.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from agent.errors import ErrorInfo
from agent.messages import Info, NNConfig, NNStatus

__all__ = [
    "CHANGED",
    "EXECUTED",
    "FAILED",
    "ROLLOUT_ID_RE",
    "Options",
    "Previous",
    "Rollout",
    "RolloutState",
    "Selection",
    "Spec",
    "Target",
    "TargetState",
    "abort_reason",
    "counts",
    "decode_rollout",
    "encode_rollout",
    "next_wave",
    "previous_of",
    "select_targets",
    "wave_size",
]

ROLLOUT_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")

TargetState = Literal[
    "pending",  # not sent yet
    "uploading",  # its agent is being sent the model (a chunked upload); nothing sent yet
    "sent",  # sent; no final answer yet
    "succeeded",
    "failed",  # the agent applied it and it failed (the camera runs its previous set again)
    "rejected",  # the agent refused it; nothing changed
    "unknown",  # no final answer within the timeout: it may or may not have run
    "rolled_back",  # succeeded, then put back to what ran before
    "rollback_failed",
    "rollback_unknown",  # the rollback got no final answer within the timeout
]
RolloutState = Literal[
    "running",
    "succeeded",  # every camera succeeded
    "completed",  # every camera was tried; failures stayed within the abort bounds
    "aborting",  # rolling back
    "aborted",  # rolled back (see each target)
    "incomplete",  # stopped with outcomes unknown (e.g. a broker link down): resume it
]

EXECUTED: Final = frozenset({"succeeded", "failed", "rejected"})
FAILED: Final = frozenset({"failed", "rejected"})
# what an abort puts back: it ran, or may have run
CHANGED: Final = frozenset({"succeeded", "sent", "unknown"})

RolloutId = Annotated[str, Meta(pattern=f"^{ROLLOUT_ID_RE.pattern}$")]
Percent = Annotated[float, Meta(gt=0.0, le=100.0)]


class Previous(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a camera's stream ran before the rollout changed it; no model: nothing ran."""

    model_sha256: str | None = None
    nn_config: NNConfig | None = None
    labels: tuple[str, ...] | None = None
    model_name: str | None = None


class Target(msgspec.Struct, kw_only=True):
    agent: str
    camera: str  # mxid
    name: str = ""
    state: TargetState = "pending"
    wave: int = 0  # 1-based, once sent
    previous: Previous | None = None  # read from its retained nn/status just before it is sent
    error: ErrorInfo | None = None
    rollback_error: ErrorInfo | None = None

    @property
    def label(self) -> str:
        return f"{self.agent}/{self.camera}" + (f" ({self.name})" if self.name else "")


class Selection(msgspec.Struct, frozen=True, omit_defaults=True):
    """Which cameras: agents in any of `groups`, named in `agents`, cameras by name or mxid
    in `cameras`; an empty list does not narrow."""

    groups: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    cameras: tuple[str, ...] = ()


class Options(msgspec.Struct, frozen=True):
    max_parallel: Annotated[int, Meta(ge=1)] = 5
    batch_percent: Percent = 100.0
    abort_percent: Annotated[float, Meta(ge=0.0, le=100.0)] = 20.0
    min_executed: Annotated[int, Meta(ge=1)] = 1
    timeout: Annotated[float, Meta(gt=0.0)] = 120.0  # per camera, for its final answer


class Spec(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the rollout does to each camera."""

    action: Literal["deploy", "delete"]
    stream: str
    nn_config: NNConfig | None = None
    model_sha256: str | None = None
    model_name: str | None = None
    labels: tuple[str, ...] | None = None
    model_url: str | None = None  # the agents download the model from here
    model_size: int | None = None  # (with model_url, when known)


class Rollout(msgspec.Struct, kw_only=True):
    id: RolloutId
    state: RolloutState = "running"
    spec: Spec
    selection: Selection = Selection()
    options: Options = Options()
    targets: list[Target] = []
    waves: int = 0  # waves started
    created_at: float = 0.0
    updated_at: float = 0.0
    reason: str | None = None  # why it was aborted or stopped
    uploaded: list[str] = []  # agents this rollout uploaded the model to

    @property
    def request_id(self) -> str:
        """Every camera's request: the camera tells them apart in the agent's record."""
        return self.id

    @property
    def rollback_request_id(self) -> str:
        return f"{self.id}.rollback"

    @property
    def finished(self) -> bool:
        return self.state in {"succeeded", "completed", "aborted"}


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Rollout)


def encode_rollout(rollout: Rollout) -> bytes:
    return _encoder.encode(rollout)


def decode_rollout(payload: bytes) -> Rollout | None:
    """The record in a retained payload; None for anything else (never raises)."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def select_targets(
    infos: dict[str, Info], online: set[str], selection: Selection, stream: str
) -> list[Target]:
    """Every camera of an online agent that the selection names and that has `stream`,
    sorted by agent and mxid."""
    targets = []
    for agent_id in sorted(infos):
        info = infos[agent_id]
        if agent_id not in online:
            continue
        if selection.groups and not set(selection.groups) & set(info.groups):
            continue
        if selection.agents and agent_id not in selection.agents:
            continue
        for camera in sorted(info.cameras, key=lambda c: c.mxid):
            if selection.cameras and not {camera.mxid, camera.name} & set(selection.cameras):
                continue
            if stream in camera.streams:
                name = camera.name if camera.name != camera.mxid else ""
                targets.append(Target(agent=agent_id, camera=camera.mxid, name=name))
    return targets


def wave_size(total: int, options: Options) -> int:
    """Cameras per wave: at most `max_parallel`, and at most `batch_percent` of the total."""
    by_percent = math.ceil(total * options.batch_percent / 100.0)
    return max(1, min(options.max_parallel, by_percent))


def next_wave(rollout: Rollout) -> list[Target]:
    """The next cameras to send to, in record order."""
    pending = [t for t in rollout.targets if t.state == "pending"]
    return pending[: wave_size(len(rollout.targets), rollout.options)]


def counts(targets: list[Target]) -> dict[str, int]:
    found: dict[str, int] = {}
    for target in targets:
        found[target.state] = found.get(target.state, 0) + 1
    return found


def abort_reason(rollout: Rollout) -> str | None:
    """Why the rollout must stop and roll back; None while failures stay within bounds."""
    executed = [t for t in rollout.targets if t.state in EXECUTED]
    failed = sum(t.state in FAILED for t in executed)
    options = rollout.options
    if len(executed) < options.min_executed or not failed:
        return None
    if failed * 100.0 > options.abort_percent * len(executed):
        return f"{failed} of {len(executed)} executed failed: more than {options.abort_percent:g} %"
    return None


def previous_of(status: NNStatus | None) -> Previous:
    """What a stream runs, from its retained nn/status (nothing when none was seen)."""
    if status is None or status.model is None or status.state == "none":
        return Previous()
    return Previous(
        model_sha256=status.model.sha256,
        nn_config=status.nn_config,
        labels=status.labels,
        model_name=status.model.name,
    )
