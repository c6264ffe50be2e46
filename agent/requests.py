"""A request, where it is in its life, what was said about it; and the bounded record of them."""

from __future__ import annotations

import enum
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple, TypeAlias

from agent.messages import Event, Progress
from agent.signing import UNSIGNED, Authenticity

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.cameras.base import Deployment
    from agent.errors import ErrorInfo
    from agent.messages import ReplyTo
    from agent.vocab import Action, RequestState

__all__ = ["Acquire", "Notice", "Phase", "Request", "RequestLog"]

_SIZE: Final = 256
_SIGNED_LIMIT: Final = 4096


class Phase(enum.Enum):
    """Where a request is; `agent.lifecycle.Slots` moves it on, one phase at a time."""

    STAGED = enum.auto()  # submitted: waits for the next state write
    WRITING = enum.auto()  # in the state write under way, which is to record it
    TRANSFERRING = enum.auto()  # recorded: waits for its model (an upload, a download)
    QUEUED = enum.auto()  # recorded: waits for the camera's next apply
    APPLYING = enum.auto()  # in the camera's apply under way
    DONE = enum.auto()  # finished, superseded or refused: nothing more happens to it


Acquire: TypeAlias = Callable[[Callable[[int, int | None], None]], Awaitable["Deployment"]]
"""Gets a request's model (calling back with bytes received and the total) and returns its
deployment; raises an AgentError when the model cannot be had."""


class Notice(NamedTuple):
    """An event to publish, and the request whose Response Topics it goes to as well."""

    event: Event
    request: Request


@dataclass(eq=False)
class Request:
    """One command for one stream and everything said about it."""

    id: str
    action: Action
    camera: str
    stream: str
    deployment: Deployment | None = None
    replies: list[ReplyTo] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # restores an interrupted request's change after a restart; its answer was already sent
    silent: bool = False
    # read from the state file: its answer went out from an earlier run, or was lost with it
    recorded_before: bool = False
    phase: Phase = Phase.STAGED
    # a deploy whose model is still on its way: how to get it (deployment None until then)
    acquire: Acquire | None = None

    @property
    def awaits_model(self) -> bool:
        """A deploy accepted before its model is there (it is `transferring` meanwhile)."""
        return self.acquire is not None and self.deployment is None

    @property
    def model_arrived(self) -> bool:
        """A deploy accepted before its model was there, whose model is there now."""
        return self.acquire is not None and self.deployment is not None

    # who sent it (for the audit log); None: not known (answered after a restart)
    authenticity: Authenticity | None = UNSIGNED
    # signed: its expires_at; its record is kept against replays at least until then
    keep_until: float | None = None
    # sent to a group (`{prefix}/groups/{group}/...`): its events name the group too
    group: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Its key in the `RequestLog`: a group command is one request per camera, under
        the group's request_id, so the camera tells them apart."""
        return (self.id, self.camera)

    @property
    def last(self) -> Event | None:
        return self.events[-1] if self.events else None

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.terminal

    def event(
        self,
        state: RequestState,
        *,
        error: ErrorInfo | None = None,
        superseded_by: str | None = None,
        progress: Progress | None = None,
    ) -> Event:
        """An event about this request, not recorded (see `say`)."""
        return Event(
            request_id=self.id,
            action=self.action,
            camera=self.camera,
            stream=self.stream,
            state=state,
            ts=time.time(),
            error=error,
            superseded_by=superseded_by,
            group=self.group,
            progress=progress,
        )

    def say(
        self,
        state: RequestState,
        *,
        error: ErrorInfo | None = None,
        superseded_by: str | None = None,
        progress: Progress | None = None,
    ) -> list[Notice]:
        """Record the request's next event; return it to publish (nothing when silent).

        A `transferring` event replaces the one before it: only the latest progress is kept.
        """
        if self.silent:
            return []
        event = self.event(state, error=error, superseded_by=superseded_by, progress=progress)
        if state == "transferring" and self.last is not None and self.last.state == state:
            self.events[-1] = event
        else:
            self.events.append(event)
        return [Notice(event, self)]


class RequestLog:
    """Recent requests by request_id and camera, so a repeated request_id is answered from
    the record (one group command is a request per camera, all under one request_id).

    The last `size` requests, and besides them every signed request until its `keep_until`
    (its expires_at) passes: a signed command replayed while it is valid is answered from
    the record however many requests came since. At most `signed_limit` of those at once:
    `signed_room` tells the boundary to refuse more.
    """

    def __init__(self, size: int = _SIZE, *, signed_limit: int = _SIGNED_LIMIT) -> None:
        self._size = size
        self._signed_limit = signed_limit
        self._requests: OrderedDict[tuple[str, str], Request] = OrderedDict()
        # signed requests past the last `size`, kept until their `keep_until`
        self._kept: dict[tuple[str, str], Request] = {}

    def get(self, request_id: str, camera: str) -> Request | None:
        key = (request_id, camera)
        return self._requests.get(key) or self._kept.get(key)

    def add(self, request: Request) -> None:
        self._kept.pop(request.key, None)
        self._requests[request.key] = request
        self._requests.move_to_end(request.key)
        now = time.time()
        while len(self._requests) > self._size:
            oldest = next(iter(self._requests.values()))
            if not oldest.done:  # never forget a request that still has to be answered
                break
            self._requests.popitem(last=False)
            if oldest.keep_until is not None and oldest.keep_until >= now:
                self._kept[oldest.key] = oldest
        self.expire(now)

    def expire(self, now: float) -> None:
        """Forget the signed requests kept past the last `size` whose time has passed."""
        gone = [r.key for r in self._kept.values() if r.keep_until is None or r.keep_until < now]
        for key in gone:
            del self._kept[key]

    def signed_room(self, now: float) -> float | None:
        """None when one more signed request may be taken; else the seconds until one of
        those kept expires."""
        self.expire(now)
        live = [
            r.keep_until
            for r in itertools.chain(self._kept.values(), self._requests.values())
            if r.keep_until is not None and r.keep_until >= now
        ]
        if len(live) < self._signed_limit:
            return None
        return max(0.0, min(live) - now)

    def discard(self, request: Request) -> None:
        """Forget a request that was refused after all: its id may be sent again."""
        if self._requests.get(request.key) is request:
            del self._requests[request.key]

    def __iter__(self) -> Iterator[Request]:
        """Oldest first: the signed ones kept past the last `size`, then those."""
        return itertools.chain(self._kept.values(), self._requests.values())
