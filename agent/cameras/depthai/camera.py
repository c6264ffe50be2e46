"""One OAK device: apply an NN set by booting a pipeline, read its outputs in a thread."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import structlog

from agent.cameras.base import Camera, DeviceHealth, Output
from agent.cameras.depthai.device import CLOSE_TIMEOUT, Boot, DeviceBusy, Session
from agent.cameras.depthai.outputs import to_health, to_output
from agent.cameras.pipeline import SYSINFO_XLINK, build_pipeline, stream_of
from agent.errors import CameraOffline, DeployFailed
from agent.messages import CameraStats

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from agent.cameras.base import CameraListener, NNSet
    from agent.cameras.features import CameraFeatures
    from agent.config import DepthaiSection

__all__ = ["DepthaiCamera"]

log = structlog.get_logger(__name__)

_POLL: Final = timedelta(milliseconds=100)  # how soon a reader notices it should stop
_OUTPUT_BUFFER: Final = 64  # outputs waiting for the listener before we drop
_MISSES_TO_ABSENT: Final = 2  # a USB device re-enumerates for a moment after it is closed


class DepthaiCamera(Camera):
    """One OAK device. Methods run on the event loop; depthai calls go to worker threads."""

    def __init__(
        self,
        mxid: str,
        *,
        name: str,
        features: CameraFeatures,
        product: str = "OAK",
        firmware: str | None = None,
        target: str,
        settings: DepthaiSection,
        listener: CameraListener,
        unicast: bool = False,
    ) -> None:
        self._mxid = mxid
        self._name = name
        self._product = product
        self._firmware = firmware
        self._features = features
        self.target = target  # what `dai.DeviceInfo` opens: mxid (USB) or IP address (PoE)
        self.unicast = unicast  # found by address: broadcast discovery may never list it
        self._settings = settings
        self._listener = listener
        self._limiter = anyio.CapacityLimiter(1)
        # held by the thread inside dai.Device(...) or device.close(); outlives abandoning it
        self._device_lock = threading.Lock()
        self._reader_limiter = anyio.CapacityLimiter(1)
        self._session: Session | None = None
        self._present = True
        self._busy = False
        self._misses = 0
        self._waiting: set[str] = set()
        self._settled = anyio.Event()
        self._lost_error: str | None = None
        self._send, self._receive = anyio.create_memory_object_stream[Output](_OUTPUT_BUFFER)
        self._tg: TaskGroup | None = None
        self._outputs = 0
        self._dropped: Counter[str] = Counter()  # per stream
        self._unreadable = 0  # counted in the reader thread
        self._booted_at: float | None = None  # monotonic, while a session is open
        self._system: Any = None  # the latest SystemLogger report of the open session
        self.boots = 0

    @property
    def mxid(self) -> str:
        return self._mxid

    @property
    def name(self) -> str:
        return self._name

    @property
    def product(self) -> str:
        return self._product

    @property
    def firmware(self) -> str | None:
        return self._firmware

    @property
    def features(self) -> CameraFeatures:
        return self._features

    @property
    def streams(self) -> tuple[str, ...]:
        return self._features.streams

    @property
    def present(self) -> bool:
        return self._present

    @property
    def stats(self) -> CameraStats:
        return CameraStats(
            outputs=self._outputs, dropped=self._dropped.total(), unreadable=self._unreadable
        )

    @property
    def health(self) -> DeviceHealth:
        booted_at, system = self._booted_at, self._system
        uptime = None if booted_at is None else time.monotonic() - booted_at
        dropped = dict(self._dropped)
        if system is None:
            return DeviceHealth(uptime=uptime, dropped=dropped)
        try:
            return to_health(system, uptime=uptime, dropped=dropped)
        except (AttributeError, TypeError, ValueError):
            log.exception("camera system report unreadable", camera=self._mxid)
            self._system = None
            return DeviceHealth(uptime=uptime, dropped=dropped)

    # --- presence, driven by discovery and by the reader ---------------------------------

    def seen(self, target: str) -> None:
        self.target = target
        self._misses = 0
        if not self._present and self._session is None:
            self._set_present(True)

    def missed(self) -> None:
        if self._session is not None or self._busy or self.unicast:
            return  # depthai does not list a device that is open
        self._misses += 1
        if self._misses >= _MISSES_TO_ABSENT and self._present:
            self._set_present(False)

    def _set_present(self, present: bool) -> None:
        self._present = present
        log.info("camera presence", camera=self._mxid, present=present)
        self._listener.on_presence(self._mxid, present)

    # --- apply ---------------------------------------------------------------------------

    async def apply(self, nn_set: NNSet) -> None:
        if not self._present:
            raise CameraOffline(camera=self._mxid)
        self._busy = True
        try:
            await self._close()
            if not nn_set:
                return  # a camera running nothing needs no boot
            try:
                pipeline = await anyio.to_thread.run_sync(
                    build_pipeline, self._features, nn_set, limiter=self._limiter
                )
            except (RuntimeError, ValueError, KeyError) as exc:
                raise DeployFailed(f"cannot build the pipeline: {exc}") from exc
            await self._boot(pipeline, sorted(nn_set))
        finally:
            self._busy = False

    async def _boot(self, pipeline: Any, streams: list[str]) -> None:
        settings = self._settings
        error = ""
        for attempt in range(settings.boot_retries):
            if attempt:
                await anyio.sleep(2.0 ** (attempt - 1))
            if not self._present:
                raise CameraOffline(camera=self._mxid)
            try:
                session = await self._open(pipeline, streams)
            except DeployFailed as exc:
                error = exc.message
                log.warning(
                    "camera boot failed", camera=self._mxid, attempt=attempt + 1, error=error
                )
                continue
            self.boots += 1
            await self._await_first_outputs(session, streams)
            return
        raise DeployFailed(
            f"camera {self._mxid} did not boot ({settings.boot_retries} tries): {error}"
        )

    async def _open(self, pipeline: Any, streams: list[str]) -> Session:
        boot = Boot(
            pipeline,
            target=self.target,
            streams=streams,
            device_lock=self._device_lock,
            wait=self._settings.boot_timeout,
        )
        try:
            with anyio.fail_after(self._settings.boot_timeout):
                session = await anyio.to_thread.run_sync(
                    boot.run, limiter=self._limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            await self._close_session(boot.abandon())
            raise DeployFailed(f"no boot within {self._settings.boot_timeout:g} s") from None
        except (DeviceBusy, RuntimeError) as exc:  # RuntimeError: depthai failed to boot it
            raise DeployFailed(str(exc)) from exc
        except BaseException:
            await self._close_session(boot.abandon())
            raise
        assert session is not None  # None only once abandoned
        self._session = session
        self._booted_at, self._system = time.monotonic(), None
        self._waiting = set(streams)
        self._settled = anyio.Event()
        self._lost_error = None
        assert self._tg is not None  # run() is started before the camera is adopted
        self._tg.start_soon(self._read, session, name=f"camera[{self._mxid}].reader")
        return session

    async def _await_first_outputs(self, session: Session, streams: list[str]) -> None:
        timeout = self._settings.first_output_timeout
        with anyio.move_on_after(timeout):
            await self._settled.wait()
        if self._lost_error is not None:
            raise DeployFailed(f"camera {self._mxid} was lost while starting: {self._lost_error}")
        if self._waiting:
            silent = ", ".join(sorted(self._waiting))
            logs = " | ".join(session.device_log)
            await self._close()
            raise DeployFailed(
                f"no output from the NN on {silent} within {timeout:g} s"
                + (f"; device log: {logs}" if logs else "")
            )
        log.info("camera running", camera=self._mxid, streams=streams, boots=self.boots)

    # --- reading -------------------------------------------------------------------------

    async def _read(self, session: Session) -> None:
        error = await anyio.to_thread.run_sync(
            self._reader_loop, session, limiter=self._reader_limiter, abandon_on_cancel=True
        )
        if error is None or session is not self._session:
            return  # stopped on purpose, or a device we already replaced
        log.warning("camera disconnected", camera=self._mxid, error=error)
        self._lost_error = error
        self._settled.set()
        await self._close()
        self._set_present(False)

    def _reader_loop(self, session: Session) -> str | None:
        """Runs in the reader thread; returns why the device was lost, None when stopped."""
        names = list(session.queues)
        device = session.device
        while not session.stop.is_set():
            try:
                ready = device.getQueueEvents(names, timeout=_POLL)
                messages = [(n, m) for n in ready for m in session.queues[n].tryGetAll()]
                closed = device.isClosed()
            # X_LINK_ERROR and friends: the device is gone; whatever depthai raises here
            # ends this session (the camera goes offline and is reopened), never the agent
            except Exception as exc:  # noqa: BLE001
                return None if session.stop.is_set() else f"{type(exc).__name__}: {exc}"
            batch = [o for name, m in messages if (o := self._convert(name, m)) is not None]
            if batch:
                try:
                    anyio.from_thread.run_sync(self._deliver, session, batch)
                except anyio.RunFinishedError:
                    return None  # the event loop has ended
            if closed and not session.stop.is_set():
                return "device closed"
        return None

    def _convert(self, name: str, message: Any) -> Output | None:
        """One device message as an Output; None (logged, counted) when it cannot be read,
        or when it is a SystemLogger report (kept for the stats)."""
        if name == SYSINFO_XLINK:
            self._system = message  # read on the loop when the stats are published
            return None
        try:
            return to_output(self._mxid, stream_of(name), message)
        except Exception:
            self._unreadable += 1
            if self._unreadable & (self._unreadable - 1) == 0:  # log at powers of two
                log.exception("camera output unreadable", camera=self._mxid, queue=name)
            return None

    def _deliver(self, session: Session, batch: list[Output]) -> None:
        if session is not self._session:
            return  # the tail of a device we closed
        for output in batch:
            if self._waiting:
                self._waiting.discard(output.stream)
                if not self._waiting:
                    self._settled.set()
            try:
                self._send.send_nowait(output)
            except anyio.WouldBlock:
                self._dropped[output.stream] += 1
                dropped = self._dropped.total()
                if dropped & (dropped - 1) == 0:  # log at powers of two
                    log.warning("camera outputs dropped", camera=self._mxid, dropped=dropped)

    # --- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Forward outputs to the listener until cancelled; close the device on the way out."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                async for output in self._receive:
                    self._listener.on_output(output)
                    self._outputs += 1
        finally:
            await self._close()  # shielded and time-bounded

    async def _close(self) -> None:
        session, self._session = self._session, None
        self._booted_at, self._system = None, None
        await self._close_session(session)

    async def _close_session(self, session: Session | None) -> None:
        if session is None:
            return
        session.stop.set()
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
            # abandon_on_cancel lets the time bound hold; the thread finishes the close alone
            try:
                await anyio.to_thread.run_sync(
                    session.close, limiter=self._limiter, abandon_on_cancel=True
                )
            except (DeviceBusy, RuntimeError) as exc:  # RuntimeError: depthai failed to close it
                log.error("camera close failed", camera=self._mxid, error=str(exc))  # noqa: TRY400
        if scope.cancelled_caught:
            log.error("camera close timed out", camera=self._mxid, timeout=CLOSE_TIMEOUT)
