"""Which of an agent's cameras a group command's `target` selects: a pure function."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from agent.cameras.base import Camera
    from agent.messages import GroupTarget

__all__ = ["select"]


def select(target: GroupTarget, cameras: Iterable[Camera]) -> list[str]:
    """The mxids `target` names here, sorted: with `*` every camera that has the stream;
    otherwise each camera whose mxid or name is listed, whether or not it has the stream
    (named explicitly, it is answered `unknown_stream` rather than passed over)."""
    if target.everything:
        return sorted(c.mxid for c in cameras if target.stream in c.streams)
    wanted = set(target.cameras)
    return sorted(c.mxid for c in cameras if c.mxid in wanted or (c.name and c.name in wanted))
