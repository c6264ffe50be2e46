"""Accepted requests and the bounded record of their outcomes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.cameras.base import Deployment
    from agent.messages import Event, ReplyTo
    from agent.vocab import Action

__all__ = ["Request", "RequestLog"]

_SIZE: Final = 256


@dataclass(eq=False)
class Request:
    """One accepted command and everything said about it."""

    id: str
    action: Action
    camera: str
    stream: str
    deployment: Deployment | None = None
    replies: list[ReplyTo] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # restores an interrupted request's change after a restart; its answer was already sent
    silent: bool = False

    @property
    def last(self) -> Event | None:
        return self.events[-1] if self.events else None

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.terminal


class RequestLog:
    """Recent requests by id, so a repeated request_id is answered from the record."""

    def __init__(self, size: int = _SIZE) -> None:
        self._size = size
        self._requests: OrderedDict[str, Request] = OrderedDict()

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add(self, request: Request) -> None:
        self._requests[request.id] = request
        self._requests.move_to_end(request.id)
        while len(self._requests) > self._size:
            oldest = next(iter(self._requests.values()))
            if not oldest.done:  # never forget a request that still has to be answered
                break
            self._requests.popitem(last=False)

    def discard(self, request: Request) -> None:
        """Forget a request that was refused after all: its id may be sent again."""
        if self._requests.get(request.id) is request:
            del self._requests[request.id]

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests.values())
