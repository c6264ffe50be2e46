"""One worker per camera: applies what its slots have queued, and publishes what they show.

The worker takes everything queued with one restart (`agent.lifecycle` decides what is
queued); a failed apply leaves the camera running nothing, and the next goes back to what
ran before. What each step says goes to the coordinator, which publishes it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
import msgspec
import structlog

from agent import status
from agent.errors import AgentError, CameraOffline, Internal, error_info
from agent.lifecycle import Slots
from agent.messages import CameraStatus, NNStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from agent.cameras.base import Camera, Deployment
    from agent.errors import ErrorInfo
    from agent.reporter import Reporter
    from agent.requests import Notice, Request
    from agent.topics import Topics
    from agent.vocab import CameraStateName

__all__ = ["CameraWorker"]

log = structlog.get_logger(__name__)

_S = TypeVar("_S", NNStatus, CameraStatus)
_RETRY_MAX: Final = 60.0


class CameraWorker:
    """Owns one camera; nothing else touches it."""

    def __init__(
        self,
        camera: Camera,
        reporter: Reporter,
        topics: Topics,
        *,
        changed: Callable[[], Awaitable[None]],
        announce: Callable[[list[Notice]], None],
    ) -> None:
        self.camera = camera
        self.mxid = camera.mxid  # never changes
        self.slots = Slots()
        self._reporter = reporter
        self._topics = topics
        self._changed = changed  # persists the state
        self._announce = announce  # publishes what a step said, answers once recorded
        self.state: CameraStateName = "offline"
        self.restarts = 0
        self._boot_failures = 0
        self._last_error: ErrorInfo | None = None
        self._wake = anyio.Event()
        # set once the state saved for this camera by an earlier run is taken over
        self.restored = anyio.Event()
        self._published_nn: dict[str, NNStatus] = {}
        self._published_camera: CameraStatus | None = None

    @property
    def running(self) -> dict[str, Deployment]:
        return self.slots.running

    def restore(
        self, running: dict[str, Deployment], changes: list[Request], previous: dict[str, str]
    ) -> None:
        """Start from the last good set (and the model each stream ran before it), with
        interrupted changes queued to converge."""
        self.slots.restore(running, changes, previous)
        self._wake.set()

    def commit(self) -> None:
        """A state write recorded what the slots prepared: settle it, or apply it next."""
        if self.slots.commit():
            self._wake.set()
        self._publish()

    def presence_changed(self) -> None:
        if self.camera.present:
            self.slots.booted = False
        self._wake.set()

    # --- the worker loop -----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self._has_work():
                await self._wake.wait()
            self._wake = anyio.Event()
            if not self.camera.present:
                self._go_offline()
                await self._changed()
                continue
            if self._boot_failures > 1:  # the first retry (the rollback) goes at once
                delay = min(_RETRY_MAX, 2.0 ** (self._boot_failures - 2))
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if not self.camera.present:
                    continue
            await self._apply()
            await self._changed()

    def _has_work(self) -> bool:
        if not self.camera.present:
            return self.state != "offline" or self.slots.has_queued()
        return not self.slots.booted or self.slots.has_queued()

    async def _apply(self) -> None:
        self._announce(self.slots.start_apply())
        target = self.slots.target()
        booted = self.slots.booted
        restart = not (booted and _same_networks(target, self.slots.running))
        if restart and not target and not booted:
            restart = False  # nothing to run: a camera with no NN needs no boot
        try:
            if restart:
                await self._restart(target)
            else:
                self.slots.booted = True
                self.state = "online"
        except AgentError as exc:
            info = error_info(exc)
            self._boot_failures += 1
            self._last_error = info
            log.warning(
                "apply failed",
                camera=self.mxid,
                code=exc.code,
                error=exc.message,
                requests=[r.id for r in self.slots.applying()],
            )
            self._announce(self.slots.apply_failed(info))
        else:
            self._boot_failures = 0
            self._announce(self.slots.apply_succeeded())
        finally:
            # cancelled (shutting down): the batch stays applying, so a state write that
            # still happens records it as unfinished, to be answered `interrupted`
            self._publish()

    async def _restart(self, target: dict[str, Deployment]) -> None:
        self.state = "restarting"
        self._publish()
        log.info("camera restarting", camera=self.mxid, streams=sorted(target))
        self.restarts += 1
        try:
            await self.camera.apply(target)
        except AgentError:
            raise
        except Exception as exc:
            log.exception("camera apply raised", camera=self.mxid)
            raise Internal(f"{type(exc).__name__}: {exc}") from exc
        self.slots.booted = True
        self.state = "online"
        log.info("camera online", camera=self.mxid, streams=sorted(target))

    def _go_offline(self) -> None:
        self.slots.booted = False
        self._boot_failures = 0
        self._announce(self.slots.fail_queued(error_info(CameraOffline(camera=self.mxid))))
        if self.state != "offline":
            log.warning("camera offline", camera=self.mxid)
            self.state = "offline"
        self._publish()

    # --- what the camera shows -----------------------------------------------------------

    def _publish(self) -> None:
        """Route the running NNs' output, and publish the status where it changed."""
        routes = status.routes(self._topics, self.mxid, self.state, self.slots.running)
        self._reporter.routes(self.mxid, routes, self.slots.running.keys())
        now = time.time()
        nn = status.nn_statuses(self.camera.streams, self.slots)
        for stream, current in nn.items():
            if current != self._published_nn.get(stream):
                self._published_nn[stream] = current
                self._reporter.nn_status(self.mxid, stream, _stamped(current, now))
        camera = status.camera_status(
            self.camera, self.state, nn, restarts=self.restarts, last_error=self._last_error
        )
        if camera != self._published_camera:
            self._published_camera = camera
            self._reporter.camera_status(
                self.mxid, msgspec.structs.replace(_stamped(camera, now), stats=self.camera.stats)
            )
            self._reporter.camera_availability(self.mxid, self.state != "offline")


def _stamped(value: _S, now: float) -> _S:
    return msgspec.structs.replace(value, updated_at=now)


def _same_networks(a: Mapping[str, Deployment], b: Mapping[str, Deployment]) -> bool:
    return a.keys() == b.keys() and all(a[s].same_network(b[s]) for s in a)
