"""Names shared by the wire schema, the topics, the state file and the workers, defined once."""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "TERMINAL_STATES",
    "Action",
    "CameraStateName",
    "NNStateName",
    "RequestState",
    "UploadStateName",
]

Action = Literal["deploy", "delete"]
"""What a command asks for one stream: the last segment of its topic."""

RequestState = Literal[
    "accepted", "transferring", "applying", "succeeded", "failed", "superseded", "rejected"
]
"""The `state` of a request event."""

TERMINAL_STATES: Final = frozenset({"succeeded", "failed", "superseded", "rejected"})

CameraStateName = Literal["online", "restarting", "offline"]
"""The `state` of a camera status."""

NNStateName = Literal["none", "deploying", "running", "failed"]
"""The `state` of one stream's NN status."""

UploadStateName = Literal["receiving", "stored", "failed"]
"""The `state` of a chunked model upload's status."""
