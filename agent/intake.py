"""The command boundary's intake: one task that takes every message in, whatever front end
received it, and has each handled in its lane, concurrently across lanes, with a bound.

A front end (the MQTT link; later a REST gateway) hands each message and its receipt to
`Intake.receive`. The messages of one lane (one camera) are handled one after the other in
arrival order, so one camera's commands are validated, answered and submitted in the order
they came; different lanes run at the same time, at most `concurrency` of them, so the
model a command for one camera is storing holds up no other camera. A message is handled
shielded from cancellation; its receipt is released once it is handled (its payload no
longer held) and settled once the handling is recorded (`Records.when_recorded`), or at
once when it was answered without a record (rejected).

At shutdown the messages in hand are finished (within a grace period), the records' last
write is awaited, and messages received but not handled are refused if their sender can
still be answered, and so are those submitted too late for that write (the coordinator
refuses a command submitted after it stopped, but one can be staged while its last write is
taken); then `stopped()` returns, and the front end sends its last answers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import anyio
import anyio.lowlevel
import structlog

from agent.errors import clip
from agent.heap import release_free_memory

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskGroup, TaskStatus

    from agent.inbox import Inbound, Receipt

__all__ = ["ALL_LANES", "CONCURRENCY", "Boundary", "Intake", "Records"]

log = structlog.get_logger(__name__)

CONCURRENCY: Final = 4
"""Lanes handled at once. Memory is bounded by the front end (MQTT: `receive_maximum`
messages or `max_payload_bytes` held); this bounds the threads hashing and storing models."""

ALL_LANES: Final = "/"
"""The lane of a message that may concern every lane (a group command): it is handled after
every message before it and before every message after it. No topic level is `/`."""

_GRACE_SECONDS: Final = 5.0  # for the messages in hand when shutting down
_CLOSING_SECONDS: Final = 3.0  # for the records' last write
_TRIM_ABOVE: Final = 1024 * 1024  # payload bytes after which freed memory is handed back


class Boundary(Protocol):
    """What the intake asks of the command boundary."""

    def lane(self, message: Inbound) -> str:
        """The lane of `message`: messages of one lane are handled in arrival order."""

    async def handle(self, message: Inbound) -> Callable[[], None] | None:
        """Validate and submit, or answer with a rejection; raise nothing of its own.

        None when the message is answered already (its answer is queued); when its answer
        waits for the records (a command submitted), how to answer it should the records
        never take it (at shutdown: submitted as their last write was taken).
        """

    def refuse(self, message: Inbound) -> None:
        """Answer a message received too late to be handled: the agent is stopping."""


class Records(Protocol):
    """Where handled commands are recorded: acknowledgements and shutdown wait on it."""

    def when_recorded(self, then: Callable[[], None]) -> None:
        """Call `then` once every command handled so far is recorded (or refused) and answered."""

    async def closed(self) -> None:
        """At shutdown: return once the records are final."""


@dataclass(eq=False, slots=True)
class _Item:
    message: Inbound | None  # None once handled: the payload may be large
    receipt: Receipt
    lane: str
    seq: int  # arrival order
    after: tuple[anyio.Event, ...]  # set when the lane's previous message(s) are done
    done: anyio.Event = field(default_factory=anyio.Event)
    unrecorded: Callable[[], None] | None = None  # answers it if the records never take it


class Intake:
    """Takes messages in from any front end; owns their handling and the shutdown refusal."""

    def __init__(
        self,
        boundary: Boundary,
        records: Records | None = None,
        *,
        concurrency: int = CONCURRENCY,
        lanes: bool = True,
    ) -> None:
        self._boundary = boundary
        self._records = records
        self._limiter = anyio.CapacityLimiter(concurrency)
        # False: one lane for all, each message handled after the previous one (the old way)
        self._lanes = lanes
        self._arrivals: deque[_Item] = deque()
        self._arrived = anyio.Event()
        self._waiting: dict[_Item, None] = {}  # received, not handled yet: in arrival order
        self._last: dict[str, _Item] = {}  # each lane's latest message
        self._arrived_count = 0
        self._unrecorded: dict[_Item, None] = {}  # handled, waiting for `when_recorded`
        self._in_hand = 0
        self._handed_back = anyio.Event()  # set when nothing is in hand
        self._handed_back.set()
        self._stopping = False
        self._running = False
        self._stopped = anyio.Event()

    def receive(self, message: Inbound, receipt: Receipt) -> None:
        """Take a message in (never blocks); it is handled in its lane's arrival order."""
        if self._stopping:  # left unanswered: the sender's transport delivers it again
            receipt.release()
            return
        lane = self._boundary.lane(message) if self._lanes else ""
        self._arrived_count += 1
        if lane == ALL_LANES:  # after every lane's latest, and every lane's latest itself
            after = tuple(item.done for item in self._last.values())
            item = _Item(message, receipt, lane, self._arrived_count, after)
            self._last = {ALL_LANES: item}
        else:
            previous = self._last.get(lane) or self._last.get(ALL_LANES)
            after = () if previous is None else (previous.done,)
            item = _Item(message, receipt, lane, self._arrived_count, after)
            self._last[lane] = item
        self._waiting[item] = None
        self._arrivals.append(item)
        self._arrived.set()

    async def stopped(self) -> None:
        """Return once a shutdown has finished, refused or left every message received."""
        if self._running:
            await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Handle what arrives until cancelled; then shut down as the module says."""
        self._running = True
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                try:
                    await self._dispatch(tg)
                except anyio.get_cancelled_exc_class():
                    try:
                        with anyio.move_on_after(_GRACE_SECONDS + _CLOSING_SECONDS, shield=True):
                            await self._stop()
                    finally:
                        self._stopped.set()
                    raise
        finally:
            self._stopping = True
            self._stopped.set()

    async def _dispatch(self, tg: TaskGroup) -> None:
        while True:
            await anyio.lowlevel.checkpoint()  # a cancelled intake takes nothing more
            while not self._arrivals:
                self._arrived = anyio.Event()
                await self._arrived.wait()
            item = self._arrivals.popleft()
            tg.start_soon(self._take, item, name=f"command[{clip(item.lane, 40)}]")

    async def _take(self, item: _Item) -> None:
        try:
            for event in item.after:
                await event.wait()
            async with self._limiter:
                if self._stopping:
                    return  # not handled: the shutdown refuses it
                del self._waiting[item]
                with anyio.CancelScope(shield=True):
                    await self._handle(item)
        finally:
            item.done.set()
            if self._last.get(item.lane) is item:
                del self._last[item.lane]

    async def _handle(self, item: _Item) -> None:
        message, receipt = item.message, item.receipt
        if message is None:  # handled already
            return
        size = len(message.payload)
        if not self._in_hand:
            self._handed_back = anyio.Event()
        self._in_hand += 1
        try:
            if receipt.redelivered:
                return  # its connection closed and the broker kept the session: it comes again
            unrecorded = await self._boundary.handle(message)
            if unrecorded is None or self._records is None:
                # nothing to record: it may go as soon as its answer and those before it
                # (also at shutdown, when the records' last write may have been taken already)
                receipt.settle()
            else:
                item.unrecorded = unrecorded
                self._unrecorded[item] = None
                self._records.when_recorded(partial(self._recorded, item))
        finally:
            item.message = message = None  # hold the payload no longer than needed
            receipt.release()
            self._in_hand -= 1
            if not self._in_hand:
                self._handed_back.set()
        if size > _TRIM_ABOVE:
            await anyio.to_thread.run_sync(release_free_memory)

    def _recorded(self, item: _Item) -> None:
        if item in self._unrecorded:  # else refused at shutdown already
            del self._unrecorded[item]
            item.receipt.settle()

    async def _stop(self) -> None:
        """Finish what is in hand; answer what was not handled, without handling it."""
        self._stopping = True  # from now on no message starts being handled
        with anyio.move_on_after(_GRACE_SECONDS) as grace:
            await self._handed_back.wait()
        if grace.cancelled_caught:
            log.error("shutting down with commands still being handled", count=self._in_hand)
            return
        if self._records is not None:
            # its last write tells about the handled commands it records as unfinished
            with anyio.move_on_after(_CLOSING_SECONDS) as closing:
                await self._records.closed()
            if closing.cancelled_caught:
                # acknowledgements go in arrival order: those after it could not go either,
                # so the ones not handled are left unanswered too, for the broker to resend
                log.error("records not final in time; commands stay unacknowledged")
                return
        # submitted while the last write was being taken, so never recorded: refused after
        # all (acknowledgements go in arrival order, it would hold up every later one)
        unrecorded = sorted(self._unrecorded, key=lambda item: item.seq)
        self._unrecorded.clear()
        for item in unrecorded:
            if item.unrecorded is not None and item.receipt.live:
                item.unrecorded()
                item.receipt.settle()
        if unrecorded:
            log.warning(
                "commands submitted too late for the last write refused", count=len(unrecorded)
            )
        waiting, self._waiting = list(self._waiting), {}
        for item in waiting:
            # one whose connection is gone cannot be acknowledged: it comes again, and the
            # next start handles it
            if item.receipt.live and item.message is not None:
                self._boundary.refuse(item.message)
                item.receipt.settle()
            item.receipt.release()
