"""One camera's stream slots and every step of the life of a request for them.

A request is staged when submitted, then taken into a state write: `accepted`, and at once
`succeeded` when it changes nothing the camera runs (labels or name only, an identical
redeploy, deleting what is not deployed); it supersedes a request queued for the same stream.
When the write is done the request is queued, and the camera's next apply takes everything
queued with one restart. When the write fails, the requests it took are refused and what they
superseded is queued again. No I/O: each step returns what it said, for the caller to publish.

A deploy whose model is still on its way (an upload in progress, a URL to download) is
accepted like any other, then waits in its slot (`transferring`) and replaces nothing yet;
any later request for its stream supersedes it. Once its model is there it is staged again
for the next state write (not `accepted` twice) and goes on like any other request; when
its model cannot be had, it fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Final

from agent.messages import Progress
from agent.requests import Phase

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from agent.cameras.base import Deployment
    from agent.errors import ErrorInfo
    from agent.requests import Notice, Request

__all__ = ["Failure", "Slot", "Slots"]

_RUNNING_SINCE: Final = attrgetter("running_since")
_QUEUED_SINCE: Final = attrgetter("queued_since")
_APPLYING_SINCE: Final = attrgetter("applying_since")


@dataclass(frozen=True, slots=True)
class Failure:
    """The last apply that failed on a stream, until one succeeds there."""

    request: Request
    error: ErrorInfo


@dataclass(eq=False, slots=True)
class Slot:
    """One stream: what runs there, and the requests on their way to it."""

    stream: str
    running: Deployment | None = None  # what runs (or ran last, while offline)
    waiting: Request | None = None  # accepted, its model on its way (`transferring`)
    queued: Request | None = None
    applying: Request | None = None
    failure: Failure | None = None
    # the sha256 of the model the stream ran before the one it runs (or ran last): kept in
    # the store, so a rollback by sha256 works however long ago the model was replaced
    previous: str | None = None
    # when each began: slots are listed in that order, so the camera applies in queue order
    running_since: int = 0
    queued_since: int = 0
    applying_since: int = 0


@dataclass(eq=False, slots=True)
class _Entry:
    """A request in the state write under way, and what undoes it if that write fails."""

    request: Request
    settles: bool  # changes nothing the camera runs: succeeds with the write
    replaced: Request | None = None  # the request it supersedes
    replaced_queued: bool = False  # (one queued before this write, not one staged in it)
    replaced_waiting: Request | None = None  # a request waiting for its model, superseded
    replaced_in_write: Request | None = None  # one to wait, staged in this write, superseded
    said: int = 0  # events `prepare` said about the request


class Slots:
    """The slots of one camera, and the requests staged or in a state write for it."""

    def __init__(self) -> None:
        self.booted = False  # the camera runs what the slots say runs
        self._slots: dict[str, Slot] = {}
        self._staged: list[Request] = []
        self._writing: list[_Entry] = []
        self._clock = 0  # orders the slots' `*_since`
        self._transfers: list[Request] = []  # began waiting for their model: to be fetched

    def get(self, stream: str) -> Slot | None:
        return self._slots.get(stream)

    def _at(self, stream: str) -> Slot:
        slot = self._slots.get(stream)
        if slot is None:
            slot = self._slots[stream] = Slot(stream)
        return slot

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @property
    def running(self) -> dict[str, Deployment]:
        """What runs (or ran last, while offline): the fallback when an apply fails."""
        slots = sorted(self._slots.values(), key=_RUNNING_SINCE)
        return {slot.stream: slot.running for slot in slots if slot.running is not None}

    def _queued(self) -> list[tuple[Slot, Request]]:
        slots = sorted(self._slots.values(), key=_QUEUED_SINCE)
        return [(slot, slot.queued) for slot in slots if slot.queued is not None]

    def _applying(self) -> list[tuple[Slot, Request]]:
        slots = sorted(self._slots.values(), key=_APPLYING_SINCE)
        return [(slot, slot.applying) for slot in slots if slot.applying is not None]

    def _queue(self, slot: Slot, request: Request) -> None:
        slot.queued, slot.queued_since, request.phase = request, self._tick(), Phase.QUEUED

    def _run(self, slot: Slot, request: Request) -> None:
        replaced = slot.running
        if replaced is None:
            slot.running_since = self._tick()
        elif request.deployment is None or request.deployment.model.sha256 != replaced.model.sha256:
            slot.previous = replaced.model.sha256  # a same-model change keeps the one before
        slot.running, slot.failure = request.deployment, None

    def restore(
        self,
        running: Mapping[str, Deployment],
        changes: Iterable[Request],
        previous: Mapping[str, str] | None = None,
    ) -> None:
        """Start from what ran last (and the model each stream ran before it), with the
        changes to converge to queued (silent ones)."""
        for stream, sha256 in (previous or {}).items():
            self._at(stream).previous = sha256
        for stream, deployment in running.items():
            slot = self._at(stream)
            slot.running, slot.running_since = deployment, self._tick()
        for request in changes:
            slot = self._at(request.stream)
            if slot.queued is None:
                self._queue(slot, request)

    # --- submitted, then taken into a state write ------------------------------------------

    def stage(self, request: Request) -> None:
        """Take a validated request in; nothing changes until a state write records it."""
        self._staged.append(request)

    def has_unwritten(self) -> bool:
        """True while a request waits for a state write that has not started yet."""
        return bool(self._staged)

    def has_staged(self) -> bool:
        """True while a request waits for a state write, or is in the one under way."""
        return bool(self._staged or self._writing)

    def in_write(self) -> bool:
        """True while the state write under way took requests from here."""
        return bool(self._writing)

    def prepare(self) -> list[Notice]:
        """Take the staged requests into the write about to start; return what it says.

        `accepted`, `superseded` for what they replace and `succeeded` for a change that
        needs no restart: all to be published once the write is done.
        """
        said: list[Notice] = []
        staged, self._staged = self._staged, []
        for request in staged:
            slot = self._at(request.stream)
            waits = request.awaits_model
            entry = _Entry(request, settles=not waits and not self._needs_apply(request, slot))
            same = [e for e in self._writing if e.request.stream == request.stream]
            if slot.waiting is not None and slot.waiting is not request:
                # an earlier request still waiting for its model: this one comes after it
                entry.replaced_waiting, slot.waiting = slot.waiting, None
                entry.replaced_waiting.phase = Phase.DONE
                said += entry.replaced_waiting.say("superseded", superseded_by=request.id)
            for earlier in same:  # one to wait for its model, taken in by this same write
                if earlier.request.awaits_model and earlier.request.phase is Phase.WRITING:
                    earlier.request.phase = Phase.DONE  # (refused with it if the write fails)
                    said += earlier.request.say("superseded", superseded_by=request.id)
                    entry.replaced_in_write = earlier.request
            # what waits for its model replaces nothing, and is replaced by what comes after
            latest = next((e for e in reversed(same) if not e.request.awaits_model), None)
            if waits:
                pass
            elif latest is None:
                entry.replaced, slot.queued = slot.queued, None
                entry.replaced_queued = entry.replaced is not None
            elif not latest.settles:
                entry.replaced = latest.request  # staged in this write, to be queued after it
            if entry.replaced is not None:
                entry.replaced.phase = Phase.DONE
                said += entry.replaced.say("superseded", superseded_by=request.id)
            before = len(said)
            request.phase = Phase.WRITING
            if not request.model_arrived:  # else it was accepted before its model came
                said += request.say("accepted")
            if entry.settles:
                said += request.say("succeeded")
            entry.said = len(said) - before
            self._writing.append(entry)
        return said

    def _needs_apply(self, request: Request, slot: Slot) -> bool:
        """False when the request changes nothing the camera runs: no restart needed."""
        if not self.booted or slot.applying is not None:
            return True
        if request.deployment is None:
            return slot.running is not None
        return not request.deployment.same_network(slot.running)

    def commit(self) -> bool:
        """The write recorded what `prepare` took: settle or queue it; True if any is queued.

        A request that waits for its model goes into its slot's `waiting` (see `transfers`).
        """
        writing, self._writing = self._writing, []
        queued = False
        for entry in writing:
            request = entry.request
            slot = self._at(request.stream)
            if entry.settles:
                self._run(slot, request)
                request.phase = Phase.DONE
            elif request.phase is not Phase.WRITING:  # superseded within the same write
                continue
            elif request.awaits_model:
                slot.waiting, request.phase = request, Phase.TRANSFERRING
                self._transfers.append(request)
            else:
                self._queue(slot, request)
                queued = True
        return queued

    def roll_back(self) -> list[Request]:
        """The write failed: undo what `prepare` did; return the requests it took, refused.

        A request whose model arrived after it was accepted cannot be refused: it is staged
        again for the next write.
        """
        writing, self._writing = self._writing, []
        refused: list[Request] = []
        again: list[Request] = []
        for entry in reversed(writing):
            replaced = entry.replaced
            if replaced is not None:
                if not replaced.silent:
                    replaced.events.pop()  # its `superseded`, never sent
                if entry.replaced_queued:
                    self._queue(self._at(replaced.stream), replaced)
            if entry.replaced_in_write is not None:
                entry.replaced_in_write.events.pop()  # its `superseded`; refused below
                entry.replaced_in_write.phase = Phase.WRITING
            restage = []
            waiting = entry.replaced_waiting
            if waiting is not None:
                waiting.events.pop()  # its `superseded`, never sent
                if waiting.model_arrived:
                    waiting.phase = Phase.STAGED
                    restage.append(waiting)
                else:
                    self._at(waiting.stream).waiting = waiting
                    waiting.phase = Phase.TRANSFERRING
            request = entry.request
            if request.model_arrived:
                del request.events[len(request.events) - entry.said :]
                request.phase = Phase.STAGED
                restage.append(request)
            else:
                request.events.clear()
                request.phase = Phase.DONE
                refused.append(request)
            again[:0] = restage  # in the order they were staged
        self._staged[:0] = again
        refused.reverse()
        return refused

    # --- a request waiting for its model ---------------------------------------------------

    def transfers(self) -> list[Request]:
        """The requests that began waiting for their model since the last call: fetch them."""
        transfers, self._transfers = self._transfers, []
        return transfers

    def model_arrived(self, request: Request, deployment: Deployment) -> bool:
        """The model of a waiting request is there: stage it for the next state write.

        False when there is nothing to write: it was superseded meanwhile, or a later request
        for its stream is staged and will supersede it.
        """
        slot = self._at(request.stream)
        if request.phase is not Phase.TRANSFERRING or slot.waiting is not request:
            return False
        request.deployment = deployment
        if any(r.stream == request.stream for r in self._staged):
            return False  # it stays waiting, for that one to supersede
        slot.waiting, request.phase = None, Phase.STAGED
        self._staged.append(request)
        return True

    def transfer_failed(self, request: Request, error: ErrorInfo) -> list[Notice]:
        """The model of a waiting request cannot be had: it fails."""
        slot = self._at(request.stream)
        if request.phase is not Phase.TRANSFERRING or slot.waiting is not request:
            return []
        slot.waiting, request.phase = None, Phase.DONE
        return request.say("failed", error=error)

    def progress(self, request: Request, received: int, total: int | None) -> list[Notice]:
        """How far the model of a waiting request has come: `transferring`."""
        if request.phase is not Phase.TRANSFERRING:
            return []
        return request.say("transferring", progress=Progress(received=received, total=total))

    # --- the camera's apply ----------------------------------------------------------------

    def has_queued(self) -> bool:
        return any(slot.queued is not None for slot in self._slots.values())

    def start_apply(self) -> list[Notice]:
        """Everything queued goes into the apply that starts now: `applying`."""
        said: list[Notice] = []
        for slot, request in self._queued():
            slot.queued, slot.applying, slot.applying_since = None, request, slot.queued_since
            request.phase = Phase.APPLYING
            said += request.say("applying")
        return said

    def applying(self) -> list[Request]:
        return [request for _, request in self._applying()]

    def target(self) -> dict[str, Deployment]:
        """What the camera runs once the apply under way succeeds."""
        target = self.running
        _merge(target, self.applying())
        return target

    def apply_succeeded(self) -> list[Notice]:
        said: list[Notice] = []
        for slot, request in self._applying():
            slot.applying = None
            self._run(slot, request)
            request.phase = Phase.DONE
            said += request.say("succeeded")
        return said

    def apply_failed(self, error: ErrorInfo) -> list[Notice]:
        """The camera did not come up with the target: it runs nothing until the next apply."""
        self.booted = False
        said: list[Notice] = []
        for slot, request in self._applying():
            slot.applying, slot.failure = None, Failure(request, error)
            request.phase = Phase.DONE
            said += request.say("failed", error=error)
        return said

    def fail_queued(self, error: ErrorInfo) -> list[Notice]:
        """The camera went away: what was queued for it fails."""
        said: list[Notice] = []
        for slot, request in self._queued():
            slot.queued, request.phase = None, Phase.DONE
            said += request.say("failed", error=error)
        return said

    # --- what the state file records -------------------------------------------------------

    def _waiting(self) -> list[Request]:
        """Accepted and not finished: applying, queued, waiting for a model, then in the
        write under way."""
        return [
            *self.applying(),
            *(request for _, request in self._queued()),
            *(slot.waiting for slot in self._slots.values() if slot.waiting is not None),
            # of the write under way: not the changes that settle with it, nor the superseded
            *(
                e.request
                for e in self._writing
                if not e.settles and e.request.phase is Phase.WRITING
            ),
        ]

    def desired(self) -> dict[str, Deployment]:
        """The NN set once every request the state file records is applied."""
        target = self.running
        _merge(target, self.applying())
        _merge(target, (request for _, request in self._queued()))
        _merge(target, (entry.request for entry in self._writing))
        return target

    def last_good(self) -> dict[str, Deployment]:
        """What runs, with the changes of the write under way that need no restart."""
        target = self.running
        _merge(target, (entry.request for entry in self._writing if entry.settles))
        return target

    def previous(self) -> dict[str, str]:
        """stream -> sha256 of the model it ran before its current one (see `Slot.previous`)."""
        return {s.stream: s.previous for s in self._slots.values() if s.previous is not None}

    def in_flight(self) -> list[Request]:
        """Requests the state file records as unfinished.

        Staged ones are there only in the last write at shutdown (each write takes them in
        first): not accepted, and not in the desired set, they are answered `interrupted`.
        """
        return [r for r in (*self._waiting(), *self._staged) if not r.silent]

    def deployments(self) -> Iterator[Deployment]:
        """Every NN that runs here or that a request on its way holds: its model is kept."""
        for slot in self._slots.values():
            for request in (slot.queued, slot.applying):
                if request is not None and request.deployment is not None:
                    yield request.deployment
            if slot.running is not None:
                yield slot.running
        for request in (*(e.request for e in self._writing), *self._staged):
            if request.deployment is not None:
                yield request.deployment


def _merge(target: dict[str, Deployment], requests: Iterable[Request]) -> None:
    for request in requests:
        if request.deployment is not None:
            target[request.stream] = request.deployment
        elif not request.awaits_model:  # a delete; a deploy without its model changes nothing
            target.pop(request.stream, None)
