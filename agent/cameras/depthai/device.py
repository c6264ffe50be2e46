"""Opening, probing and closing a device; every function here runs in a worker thread.

A boot or probe that timed out is abandoned, not stopped: its thread may still be inside
depthai. A per-device lock keeps anything else off the device until that thread is done.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import depthai as dai

from agent.cameras.features import CameraFeatures, Sensor
from agent.cameras.pipeline import xlink_name

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from agent.config import SensorKind

__all__ = [
    "CLOSE_TIMEOUT",
    "Boot",
    "Session",
    "exclusive",
    "probe",
]

CLOSE_TIMEOUT: Final = 10.0
_HOST_QUEUE: Final = 4  # per XLink stream; non-blocking, the device drops the oldest
_DEVICE_LOG_LINES: Final = 5
_KINDS: Final[dict[Any, SensorKind]] = {
    dai.CameraSensorType.COLOR: "color",
    dai.CameraSensorType.MONO: "mono",
}


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
def exclusive(lock: threading.Lock, timeout: float) -> Iterator[None]:
    """Hold `lock`, or fail like a device error when a thread we gave up on still holds it."""
    if not lock.acquire(timeout=timeout):
        raise RuntimeError("the device is still busy with an earlier boot that timed out")
    try:
        yield
    finally:
        lock.release()


def probe(target: str, timeout: float) -> tuple[str, str, CameraFeatures]:
    """Boot a device without a pipeline; return its mxid, product name and features."""
    with exclusive(_probe_lock, timeout), dai.Device(dai.DeviceInfo(target)) as device:
        return str(device.getMxId()), str(device.getProductName()), _read_features(device)


class Session:
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
        with exclusive(self._lock, CLOSE_TIMEOUT):
            self.device.close()


class Boot:
    """Opens a session in a worker thread; one that opens after we gave up is closed there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._session: Session | None = None

    def run(self, open_session: Callable[[], Session]) -> Session | None:
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

    def abandon(self) -> Session | None:
        """Give up; return a session that opened but was never handed over."""
        with self._lock:
            self._abandoned = True
            session, self._session = self._session, None
        return session
