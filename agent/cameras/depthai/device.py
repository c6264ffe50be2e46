"""Opening, probing and closing a device; every function here runs in a worker thread.

A boot or probe that timed out is abandoned, not stopped: its thread may still be inside
depthai. A per-device lock keeps anything else off the device until that thread is done.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import depthai as dai

from agent.cameras.features import CameraFeatures, Sensor
from agent.cameras.pipeline import SYSINFO_XLINK, xlink_name

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from agent.config import SensorKind

__all__ = [
    "CLOSE_TIMEOUT",
    "Boot",
    "BootAbandoned",
    "DeviceBusy",
    "Probed",
    "Session",
    "probe",
]

CLOSE_TIMEOUT: Final = 10.0
_HOST_QUEUE: Final = 4  # per XLink stream; non-blocking, the device drops the oldest
_DEVICE_LOG_LINES: Final = 5
_KINDS: Final[dict[Any, SensorKind]] = {
    dai.CameraSensorType.COLOR: "color",
    dai.CameraSensorType.MONO: "mono",
}


class DeviceBusy(Exception):
    """A thread we gave up on (a boot, probe or close that timed out) still holds the device."""

    def __init__(self, *, target: str) -> None:
        super().__init__("the device is still busy with an earlier boot that timed out")
        self.target = target


class BootAbandoned(Exception):
    """The boot was given up on while it waited for the device, so it must not open it."""

    def __init__(self, *, target: str) -> None:
        super().__init__("boot abandoned before the device was free")
        self.target = target


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
def _exclusive(lock: threading.Lock, timeout: float, *, target: str) -> Iterator[None]:
    """Hold `lock`, or raise DeviceBusy when a thread we gave up on still holds it."""
    if not lock.acquire(timeout=timeout):
        raise DeviceBusy(target=target)
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True, slots=True)
class Probed:
    """What opening a device once without a pipeline tells about it."""

    mxid: str
    product: str
    bootloader: str | None  # None when it was not booted through its bootloader
    features: CameraFeatures


def probe(target: str, timeout: float) -> Probed:
    """Boot a device without a pipeline; return its mxid, product name and features."""
    with (
        _exclusive(_probe_lock, timeout, target=target),
        dai.Device(dai.DeviceInfo(target)) as device,
    ):
        bootloader = device.getBootloaderVersion()
        return Probed(
            mxid=str(device.getMxId()),
            product=str(device.getProductName()),
            bootloader=None if bootloader is None else str(bootloader),
            features=_read_features(device),
        )


class Session:
    """An open device and its output queues."""

    def __init__(
        self, device: Any, streams: Sequence[str], lock: threading.Lock, *, target: str
    ) -> None:
        self.device = device
        self._lock = lock
        self._target = target
        self.queues = {
            xlink_name(s): device.getOutputQueue(xlink_name(s), _HOST_QUEUE, blocking=False)
            for s in streams
        }
        # the newest SystemLogger report is all that matters
        self.queues[SYSINFO_XLINK] = device.getOutputQueue(SYSINFO_XLINK, 1, blocking=False)
        # the device's last warnings say why an NN produced nothing
        self.device_log: deque[str] = deque(maxlen=_DEVICE_LOG_LINES)
        device.addLogCallback(self._on_log)
        self.stop = threading.Event()

    def _on_log(self, message: Any) -> None:
        self.device_log.append(str(message.payload))

    def close(self) -> None:
        self.stop.set()
        with _exclusive(self._lock, CLOSE_TIMEOUT, target=self._target):
            self.device.close()


class Boot:
    """Boots a device with a pipeline in a worker thread; one that opens after we gave up
    is closed there.

    `device_lock` is the device's own, held by the thread inside `dai.Device(...)` or
    `close()`: a boot we abandoned keeps it until depthai returns.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        target: str,
        streams: Sequence[str],
        device_lock: threading.Lock,
        wait: float,
    ) -> None:
        self._pipeline = pipeline
        self._target = target
        self._streams = streams
        self._device_lock = device_lock
        self._wait = wait
        self._lock = threading.Lock()
        self._abandoned = False
        self._session: Session | None = None

    def run(self) -> Session | None:
        """Open the device; None when the boot was abandoned meanwhile (it is closed again)."""
        session = self._open()
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

    def abandon(self) -> Session | None:
        """Give up; return a session that opened but was never handed over."""
        with self._lock:
            self._abandoned = True
            session, self._session = self._session, None
        return session

    def _open(self) -> Session:
        target, lock = self._target, self._device_lock
        with _exclusive(lock, self._wait, target=target):
            if self.abandoned:  # given up on while waiting for the device
                raise BootAbandoned(target=target)
            device = dai.Device(self._pipeline, dai.DeviceInfo(target))
        try:
            return Session(device, self._streams, lock, target=target)
        except BaseException:
            with _exclusive(lock, CLOSE_TIMEOUT, target=target):
                device.close()
            raise
