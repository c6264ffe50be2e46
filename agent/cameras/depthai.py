"""Real OAK cameras (RVC2) through depthai 2.x: discovery, apply and reading NN outputs.

Threads and the event loop:
- Discovery runs in a long-lived child process (`python -m agent.cameras.discover --every`),
  because depthai's device search holds the GIL for ~0.5 s. It does not list devices that
  are open, so a camera we have open is never counted missing; its reader notices the loss.
- Every blocking depthai call runs in a worker thread under the camera's CapacityLimiter(1).
- One reader thread per open device waits on `getQueueEvents`, converts a batch of messages
  to `Output`s (numpy, off the loop) and hands the batch to the loop with one
  `from_thread.run_sync` call; the loop puts them in a bounded stream, dropping and counting
  when it is full. One loop hop per batch is cheaper than a polled queue and adds no latency.

Features (sensors, stereo pairs) need an open device: a camera is opened once when first
seen, its features read, and closed again; only then is it adopted, with its streams known.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import depthai as dai
import msgspec
import numpy as np
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from agent.cameras.base import Camera, Output, RawLayer
from agent.cameras.features import CameraFeatures, Sensor
from agent.cameras.pipeline import build_pipeline, stream_of, xlink_name
from agent.errors import CameraOffline, DeployFailed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import numpy.typing as npt
    from anyio.abc import Process, TaskGroup, TaskStatus
    from anyio.streams.memory import MemoryObjectSendStream

    from agent.cameras.base import CameraListener, NNSet
    from agent.config import DepthaiSection, SensorKind

__all__ = ["DepthaiBackend", "DepthaiCamera", "read_layers"]

log = structlog.get_logger(__name__)

_POLL: Final = timedelta(milliseconds=100)  # how soon a reader notices it should stop
_HOST_QUEUE: Final = 4  # per XLink stream; non-blocking, the device drops the oldest
_OUTPUT_BUFFER: Final = 64  # outputs waiting for the listener before we drop
_CLOSE_TIMEOUT: Final = 10.0
_MISSES_TO_ABSENT: Final = 2  # a USB device re-enumerates for a moment after it is closed
_PROBE_RETRY_MAX: Final = 300.0
_DEVICE_LOG_LINES: Final = 5
_DISCOVERY_LINE_MAX: Final = 1 << 20
_CHILD_STOP_TIMEOUT: Final = 5.0  # SIGKILL is immediate unless the child hangs in the kernel
_KINDS: Final[dict[Any, SensorKind]] = {
    dai.CameraSensorType.COLOR: "color",
    dai.CameraSensorType.MONO: "mono",
}
_NP_DTYPES: Final[dict[Any, tuple[str, type[np.generic]]]] = {
    dai.TensorInfo.DataType.FP16: ("float16", np.float16),
    dai.TensorInfo.DataType.FP32: ("float32", np.float32),
    dai.TensorInfo.DataType.U8F: ("uint8", np.uint8),
    dai.TensorInfo.DataType.I8: ("int8", np.int8),
    dai.TensorInfo.DataType.INT: ("int32", np.int32),
}


class _Found(msgspec.Struct, frozen=True):
    mxid: str
    name: str
    state: str
    protocol: str

    @property
    def target(self) -> str:
        # a USB port name changes when the device boots; an IP address does not
        return self.name if self.protocol == "X_LINK_TCP_IP" else self.mxid


_found_decoder: Final = msgspec.json.Decoder(list[_Found])


# --- blocking helpers, run in worker threads ------------------------------------------------


def _read_features(device: Any) -> CameraFeatures:
    sensors: dict[str, Sensor] = {}
    for feature in device.getConnectedCameraFeatures():
        types = list(feature.supportedTypes)
        kind = next((_KINDS[t] for t in types if t in _KINDS), None)
        if kind is None:
            continue  # ToF and thermal sensors have no image path for an NN here
        sensors[feature.socket.name] = Sensor(kind, int(feature.width), int(feature.height))
    stereo = tuple(
        (pair.left.name, pair.right.name)
        for pair in device.getAvailableStereoPairs()  # only calibrated pairs
        # StereoDepth in 2.x is set up for horizontal pairs only
        if not pair.isVertical and pair.left.name in sensors and pair.right.name in sensors
    )
    return CameraFeatures(sensors, stereo)


_probe_lock: Final = threading.Lock()


@contextlib.contextmanager
def _exclusive(lock: threading.Lock, timeout: float) -> Iterator[None]:
    """Hold `lock`, or fail like a device error when a thread we gave up on still holds it.

    A boot or probe that timed out is abandoned, not stopped: its thread may still be
    inside depthai. Nothing else may touch the device until that thread is done.
    """
    if not lock.acquire(timeout=timeout):
        raise RuntimeError("the device is still busy with an earlier boot that timed out")
    try:
        yield
    finally:
        lock.release()


def _probe(target: str, timeout: float) -> tuple[str, str, CameraFeatures]:
    """Boot a device without a pipeline; return its mxid, product name and features."""
    with _exclusive(_probe_lock, timeout), dai.Device(dai.DeviceInfo(target)) as device:
        return str(device.getMxId()), str(device.getProductName()), _read_features(device)


class _Session:
    """An open device and its output queues."""

    def __init__(self, device: Any, streams: Sequence[str], lock: threading.Lock) -> None:
        self.device = device
        self._lock = lock
        self.queues = {
            xlink_name(s): device.getOutputQueue(xlink_name(s), _HOST_QUEUE, blocking=False)
            for s in streams
        }
        # the device's last warnings say why an NN produced nothing
        self.device_log: deque[str] = deque(maxlen=_DEVICE_LOG_LINES)
        device.addLogCallback(self._on_log)
        self.stop = threading.Event()

    def _on_log(self, message: Any) -> None:
        self.device_log.append(str(message.payload))

    def close(self) -> None:
        self.stop.set()
        with _exclusive(self._lock, _CLOSE_TIMEOUT):
            self.device.close()


class _Boot:
    """Opens a session in a worker thread; one that opens after we gave up is closed there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._session: _Session | None = None

    def run(self, open_session: Callable[[], _Session]) -> _Session | None:
        session = open_session()
        with self._lock:
            if not self._abandoned:
                self._session = session
                return session
        session.close()
        return None

    @property
    def abandoned(self) -> bool:
        with self._lock:
            return self._abandoned

    def abandon(self) -> _Session | None:
        """Give up; return a session that opened but was never handed over."""
        with self._lock:
            self._abandoned = True
            session, self._session = self._session, None
        return session


def read_layers(data: npt.NDArray[np.uint8], tensors: Sequence[Any]) -> tuple[RawLayer, ...]:
    """Every NNData layer as a flat numpy copy, dims in N, C, H, W order like the blob's."""
    layers = []
    for tensor in tensors:
        name, dtype = _NP_DTYPES[tensor.dataType]
        # depthai lists dims (and their byte strides) innermost first
        dims = tuple(int(d) for d in reversed(tensor.dims))
        strides = tuple(int(s) for s in reversed(tensor.strides))
        if len(strides) != len(dims) or not all(strides):
            strides = _contiguous(dims, np.dtype(dtype).itemsize)
        array: npt.NDArray[np.generic] = np.ndarray(
            dims, dtype=dtype, buffer=data, offset=int(tensor.offset), strides=strides
        )
        layers.append(RawLayer(tensor.name, dims, name, array.flatten()))
    return tuple(layers)


def _contiguous(dims: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = [itemsize]
    for size in reversed(dims[1:]):
        strides.append(strides[-1] * size)
    return tuple(reversed(strides))


def _detections(message: Any, *, spatial: bool) -> npt.NDArray[np.float32]:
    width = 9 if spatial else 6
    rows = [
        (d.label, d.confidence, d.xmin, d.ymin, d.xmax, d.ymax)
        + (
            (d.spatialCoordinates.x, d.spatialCoordinates.y, d.spatialCoordinates.z)
            if spatial
            else ()
        )
        for d in message.detections
    ]
    return np.array(rows, dtype=np.float32).reshape(-1, width)


def _output(camera: str, stream: str, message: Any) -> Output:
    seq = int(message.getSequenceNum())
    device_ts = message.getTimestampDevice().total_seconds()
    if isinstance(message, dai.SpatialImgDetections):
        rows = _detections(message, spatial=True)
        return Output(camera, stream, seq, device_ts, detections=rows)
    if isinstance(message, dai.ImgDetections):
        rows = _detections(message, spatial=False)
        return Output(camera, stream, seq, device_ts, detections=rows)
    layers = read_layers(message.getData(), message.getAllLayers())
    return Output(camera, stream, seq, device_ts, layers=layers)


# --- one camera -----------------------------------------------------------------------------


class DepthaiCamera(Camera):
    """One OAK device. Methods run on the event loop; depthai calls go to worker threads."""

    def __init__(
        self,
        mxid: str,
        *,
        name: str,
        features: CameraFeatures,
        target: str,
        settings: DepthaiSection,
        listener: CameraListener,
        unicast: bool = False,
    ) -> None:
        self._mxid = mxid
        self._name = name
        self.features = features
        self.target = target  # what `dai.DeviceInfo` opens: mxid (USB) or IP address (PoE)
        self.unicast = unicast  # found by address: broadcast discovery may never list it
        self._settings = settings
        self._listener = listener
        self._limiter = anyio.CapacityLimiter(1)
        # held by the thread inside dai.Device(...) or device.close(); outlives abandoning it
        self._device_lock = threading.Lock()
        self._reader_limiter = anyio.CapacityLimiter(1)
        self._session: _Session | None = None
        self._present = True
        self._busy = False
        self._misses = 0
        self._waiting: set[str] = set()
        self._settled = anyio.Event()
        self._lost_error: str | None = None
        self._send, self._receive = anyio.create_memory_object_stream[Output](_OUTPUT_BUFFER)
        self._tg: TaskGroup | None = None
        self.dropped = 0
        self.unreadable = 0
        self.boots = 0

    @property
    def mxid(self) -> str:
        return self._mxid

    @property
    def name(self) -> str:
        return self._name

    @property
    def streams(self) -> tuple[str, ...]:
        return self.features.streams

    @property
    def present(self) -> bool:
        return self._present

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
                    build_pipeline, self.features, nn_set, limiter=self._limiter
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

    async def _open(self, pipeline: Any, streams: list[str]) -> _Session:
        target = self.target
        lock = self._device_lock
        wait = self._settings.boot_timeout
        boot = _Boot()

        def open_session() -> _Session:
            with _exclusive(lock, wait):
                if boot.abandoned:  # given up on while waiting for the device
                    raise RuntimeError("boot abandoned before the device was free")
                device = dai.Device(pipeline, dai.DeviceInfo(target))
            try:
                return _Session(device, streams, lock)
            except BaseException:
                with _exclusive(lock, _CLOSE_TIMEOUT):
                    device.close()
                raise

        try:
            with anyio.fail_after(self._settings.boot_timeout):
                session = await anyio.to_thread.run_sync(
                    boot.run, open_session, limiter=self._limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            await self._close_session(boot.abandon())
            raise DeployFailed(f"no boot within {self._settings.boot_timeout:g} s") from None
        except RuntimeError as exc:
            raise DeployFailed(str(exc)) from exc
        except BaseException:
            await self._close_session(boot.abandon())
            raise
        assert session is not None  # None only once abandoned
        self._session = session
        self._waiting = set(streams)
        self._settled = anyio.Event()
        self._lost_error = None
        assert self._tg is not None  # run() is started before the camera is adopted
        self._tg.start_soon(self._read, session, name=f"camera[{self._mxid}].reader")
        return session

    async def _await_first_outputs(self, session: _Session, streams: list[str]) -> None:
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

    async def _read(self, session: _Session) -> None:
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

    def _reader_loop(self, session: _Session) -> str | None:
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
        """One device message as an Output; None (logged, counted) when it cannot be read."""
        try:
            return _output(self._mxid, stream_of(name), message)
        except Exception:
            self.unreadable += 1
            if self.unreadable & (self.unreadable - 1) == 0:  # log at powers of two
                log.exception("camera output unreadable", camera=self._mxid, queue=name)
            return None

    def _deliver(self, session: _Session, batch: list[Output]) -> None:
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
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # log at powers of two
                    log.warning("camera outputs dropped", camera=self._mxid, dropped=self.dropped)

    # --- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Forward outputs to the listener until cancelled; close the device on the way out."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                async for output in self._receive:
                    self._listener.on_output(output)
        finally:
            await self._close()  # shielded and time-bounded

    async def _close(self) -> None:
        session, self._session = self._session, None
        await self._close_session(session)

    async def _close_session(self, session: _Session | None) -> None:
        if session is None:
            return
        session.stop.set()
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True) as scope:
            # abandon_on_cancel lets the time bound hold; the thread finishes the close alone
            try:
                await anyio.to_thread.run_sync(
                    session.close, limiter=self._limiter, abandon_on_cancel=True
                )
            except RuntimeError as exc:  # the device is busy, or depthai failed to close it
                log.error("camera close failed", camera=self._mxid, error=str(exc))  # noqa: TRY400
        if scope.cancelled_caught:
            log.error("camera close timed out", camera=self._mxid, timeout=_CLOSE_TIMEOUT)


# --- the backend ----------------------------------------------------------------------------


class DepthaiBackend:
    """Every OAK device depthai finds (or `poe_addresses` reach), filtered by `allow`."""

    name = "depthai"

    def __init__(self, settings: DepthaiSection) -> None:
        self._settings = settings
        self._cameras: dict[str, DepthaiCamera] = {}
        self._by_address: dict[str, str] = {}
        self._retry_at: dict[str, tuple[float, int]] = {}  # target -> (when, failures)
        self._probe_limiter = anyio.CapacityLimiter(1)

    @property
    def cameras(self) -> Mapping[str, DepthaiCamera]:
        return self._cameras

    async def run(self, listener: CameraListener, *, task_status: TaskStatus[None]) -> None:
        if not self._settings.enabled:
            task_status.started()
            return
        send, receive = anyio.create_memory_object_stream[list[_Found]](1)
        async with anyio.create_task_group() as tg, receive:
            interval = self._settings.discovery_interval
            tg.start_soon(_discover_forever, interval, send, name="depthai.discovery")
            found = await receive.receive()
            await self._scan(tg, listener, found)
            log.info("depthai cameras", cameras=sorted(self._cameras))
            task_status.started()
            async for found in receive:
                await self._scan(tg, listener, found)

    def _allowed(self, mxid: str) -> bool:
        return not self._settings.allow or mxid in self._settings.allow

    async def _scan(self, tg: TaskGroup, listener: CameraListener, found: list[_Found]) -> None:
        listed = {f.mxid: f for f in found if self._allowed(f.mxid)}
        for mxid, camera in self._cameras.items():
            if mxid in listed:
                camera.seen(listed[mxid].target)
            else:
                camera.missed()
        for device in listed.values():
            if device.mxid not in self._cameras:
                await self._adopt(tg, listener, device.target, unicast=False)
        for address in self._settings.poe_addresses:
            reached = self._cameras.get(self._by_address.get(address, ""))
            if reached is None or not reached.present:
                await self._adopt(tg, listener, address, unicast=True)

    async def _adopt(
        self, tg: TaskGroup, listener: CameraListener, target: str, *, unicast: bool
    ) -> None:
        """Open a device once to learn its features, then drive it (or mark it present)."""
        when, failures = self._retry_at.get(target, (0.0, 0))
        if time.monotonic() < when:
            return
        try:
            with anyio.fail_after(self._settings.boot_timeout):
                # an abandoned probe closes its device itself when it returns
                mxid, product, features = await anyio.to_thread.run_sync(
                    _probe,
                    target,
                    self._settings.boot_timeout,
                    limiter=self._probe_limiter,
                    abandon_on_cancel=True,
                )
        except (RuntimeError, TimeoutError) as exc:
            delay = min(_PROBE_RETRY_MAX, self._settings.discovery_interval * 2.0**failures)
            self._retry_at[target] = (time.monotonic() + delay, failures + 1)
            log.warning("camera probe failed", target=target, error=str(exc), retry_in=delay)
            return
        self._retry_at.pop(target, None)
        if unicast:
            self._by_address[target] = mxid
        adopted = self._cameras.get(mxid)
        if adopted is not None:
            adopted.seen(target)
            return
        if not self._allowed(mxid):
            log.warning("camera not in the allow-list; ignoring it", camera=mxid, target=target)
            self._retry_at[target] = (math.inf, failures)
            return
        camera = DepthaiCamera(
            mxid,
            name=self._settings.names.get(mxid) or product or mxid,
            features=features,
            target=target,
            settings=self._settings,
            listener=listener,
            unicast=unicast,
        )
        # the listener adopts a camera through `cameras`, so it goes there first
        self._cameras[mxid] = camera
        await tg.start(camera.run, name=f"camera[{mxid}].depthai")
        log.info("camera adopted", camera=mxid, product=product, streams=camera.streams)
        listener.on_presence(mxid, True)


async def _discover_forever(interval: float, send: MemoryObjectSendStream[list[_Found]]) -> None:
    """Keep a discovery child process running; send the devices of each of its scans.

    The child runs in its own session, so a terminal's Ctrl-C (SIGINT to the foreground
    process group), Ctrl-Z or hang-up never reaches it: only this task stops it, by PID.
    """
    command = [sys.executable, "-m", "agent.cameras.discover", "--every", str(interval)]
    async with send:
        while True:
            # stderr is inherited: it carries depthai's own log lines
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stderr=None, start_new_session=True
            )
            try:
                assert process.stdout is not None  # open_process pipes stdout
                lines = BufferedByteReceiveStream(process.stdout)
                while True:
                    line = await lines.receive_until(b"\n", _DISCOVERY_LINE_MAX)
                    try:
                        found = _found_decoder.decode(line)
                    except msgspec.DecodeError as exc:  # stray output of the child
                        log.warning("camera discovery line skipped", error=str(exc))
                        continue
                    await send.send(found)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                log.warning(
                    "camera discovery stopped; restarting it", returncode=process.returncode
                )
            finally:
                await _stop_child(process)
            await anyio.sleep(interval)


async def _stop_child(process: Process) -> None:
    """Kill the discovery child by its PID and reap it, shielded and bounded in time."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CHILD_STOP_TIMEOUT) as bound:
        if process.returncode is None:
            process.kill()  # it holds no device and writes no file: nothing to clean up
        await process.aclose()
    if bound.cancelled_caught:  # in an uninterruptible call (hung USB): it dies when that returns
        log.warning("camera discovery child did not exit", pid=process.pid)
