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
    "accepted",
    "transferring",
    "applying",
    "succeeded",
    "failed",
    "superseded",
    "rejected",
    "skipped",
]
"""The `state` of a request event. `transferring`: the deploy's model is on its way (an
upload or a download), with progress. `skipped`: a group command selects none of the agent's
cameras; said once, by the agent as a whole (no camera), and nothing follows it."""

TERMINAL_STATES: Final = frozenset({"succeeded", "failed", "superseded", "rejected", "skipped"})

CameraStateName = Literal["online", "restarting", "offline"]
"""The `state` of a camera status."""

NNStateName = Literal["none", "deploying", "running", "failed"]
"""The `state` of one stream's NN status."""

UploadStateName = Literal["receiving", "stored", "failed"]
"""The `state` of a chunked model upload's status."""
