"""A deterministic fake OAK: restarts like one, produces plausible NN output, has fault knobs."""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Final

import anyio
import numpy as np
import structlog

from agent.cameras.base import (
    Camera,
    CameraListener,
    Deployment,
    DeviceHealth,
    NNSet,
    Output,
    RawLayer,
)
from agent.cameras.features import CameraFeatures, Sensor
from agent.errors import CameraOffline, DeployFailed
from agent.messages import (
    CameraStats,
    DeviceMemory,
    LeonCpu,
    MemoryUse,
    MobileNetConfig,
    SimObject,
    Temperatures,
    YoloConfig,
)
from agent.topics import is_depth_stream

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy.typing as npt
    from anyio.abc import TaskStatus

    from agent.config import SimulatedCamera as CameraSpec
    from agent.messages import ObjectSchedule

__all__ = ["SimulatedCamera", "SimulatorBackend"]

log = structlog.get_logger(__name__)

_MOBILENET_CLASSES: Final = 21  # PASCAL VOC, the usual MobileNet-SSD label set
_MIB: Final = 1024 * 1024
# an RVC2's memories, as its SystemLogger reports them
_DDR_TOTAL: Final = 512 * _MIB
_CMX_TOTAL: Final = 2560 * 1024
_CSS_HEAP_TOTAL: Final = 52 * _MIB
_MSS_HEAP_TOTAL: Final = 38 * _MIB


class _Schedule:
    """The objects knob's schedule, shared by the camera's producers; `version` tells them
    to start again from its first frame."""

    def __init__(self) -> None:
        self.plan: ObjectSchedule | None = None
        self.version = 0

    def set(self, plan: ObjectSchedule | None) -> None:
        self.plan = plan
        self.version += 1


def _features(spec: CameraSpec) -> CameraFeatures:
    return CameraFeatures({s: Sensor(kind) for s, kind in spec.sensors.items()}, spec.stereo)


class SimulatedCamera(Camera):
    """One simulated OAK. All methods run on the event loop."""

    def __init__(self, spec: CameraSpec) -> None:
        self._spec = spec
        self._features = _features(spec)
        self._present = True
        self._running: dict[str, Deployment] = {}
        self._booting = False
        self._fail_next_boot = False
        self._changed = anyio.Event()
        self._unplugged = anyio.Event()
        self._listener: CameraListener | None = None
        self._outputs = 0
        self._booted_at: float | None = None
        self._schedule = _Schedule()
        self._schedule.set(spec.schedule)
        self.boots = 0

    @property
    def mxid(self) -> str:
        return self._spec.mxid

    @property
    def name(self) -> str:
        return self._spec.name or self._spec.mxid

    @property
    def product(self) -> str:
        return "OAK (simulated)"

    @property
    def firmware(self) -> str | None:
        return None

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
        return CameraStats(outputs=self._outputs)

    @property
    def health(self) -> DeviceHealth:
        """Plausible RVC2 figures while a pipeline runs (as a SystemLogger would report)."""
        if self._booted_at is None or not self._running:
            return DeviceHealth()
        now = time.monotonic()
        uptime = now - self._booted_at
        nns = len(self._running)
        # 40-60 degrees: warmer with more networks, drifting slowly
        average = 44.0 + 3.0 * nns + 4.0 * math.sin(now / 60.0 + _seed(self.mxid))
        average = min(60.0, max(40.0, average))
        model_bytes = sum(d.model.size for d in self._running.values())
        wobble = math.sin(now / 7.0)
        return DeviceHealth(
            uptime=uptime,
            temperature=Temperatures(
                average=round(average, 2),
                css=round(average + 1.1, 2),
                mss=round(average + 0.4, 2),
                upa=round(average - 0.6, 2),
                dss=round(average - 0.9, 2),
            ),
            memory=DeviceMemory(
                ddr=MemoryUse(used=180 * _MIB + nns * 24 * _MIB + model_bytes, total=_DDR_TOTAL),
                cmx=MemoryUse(
                    used=min(_CMX_TOTAL, 1536 * 1024 + nns * 256 * 1024), total=_CMX_TOTAL
                ),
                leon_css_heap=MemoryUse(used=17 * _MIB + nns * _MIB, total=_CSS_HEAP_TOTAL),
                leon_mss_heap=MemoryUse(used=9 * _MIB + nns * 3 * _MIB, total=_MSS_HEAP_TOTAL),
            ),
            leon_cpu=LeonCpu(
                css=round(min(95.0, 14.0 + 6.0 * nns + 3.0 * wobble), 2),
                mss=round(min(95.0, 6.0 + 11.0 * nns + 2.0 * wobble), 2),
            ),
            dropped=dict.fromkeys(self._running, 0),
        )

    def schedule_objects(self, plan: ObjectSchedule | None) -> None:
        """What every detector network sees from its next frame on; None: the moving objects."""
        self._schedule.set(plan)

    async def apply(self, nn_set: NNSet) -> None:
        if not self._present:
            raise CameraOffline(camera=self.mxid)
        self._running = {}
        self._booted_at = None
        self._booting = True
        self._notify()
        try:
            with anyio.move_on_after(self._spec.boot_seconds):
                await self._unplugged.wait()
            self.boots += 1
            if not self._present:
                raise CameraOffline(camera=self.mxid)
            if self._fail_next_boot:
                self._fail_next_boot = False
                raise DeployFailed(
                    "simulated device error: X_LINK_ERROR while booting the pipeline"
                )
            self._running = dict(nn_set)
            self._booted_at = time.monotonic()
        finally:
            self._booting = False
            self._notify()

    # --- fault knobs ---------------------------------------------------------------------

    def unplug(self) -> None:
        if not self._present:
            return
        self._present = False
        self._running = {}
        self._booted_at = None
        self._unplugged.set()
        self._notify()
        if self._listener is not None:
            self._listener.on_presence(self.mxid, False)

    def replug(self) -> None:
        if self._present:
            return
        self._present = True
        self._unplugged = anyio.Event()
        self._notify()
        if self._listener is not None:
            self._listener.on_presence(self.mxid, True)

    def fail_next_boot(self) -> None:
        self._fail_next_boot = True

    # --- producing output ----------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    async def run(self, listener: CameraListener) -> None:
        """Produce output for whatever runs, restarting producers on every change."""
        self._listener = listener
        while True:
            self._changed = anyio.Event()
            async with anyio.create_task_group() as tg:
                for stream, deployment in self._running.items():
                    tg.start_soon(
                        self._produce,
                        listener,
                        stream,
                        deployment,
                        name=f"camera[{self.mxid}].{stream}",
                    )
                await self._changed.wait()
                tg.cancel_scope.cancel()

    async def _produce(self, listener: CameraListener, stream: str, dep: Deployment) -> None:
        period = 1.0 / self._spec.fps
        make = _frame_maker(self.mxid, stream, dep, self._spec.objects, self._schedule)
        start = time.monotonic()
        seq = 0
        while True:
            seq += 1
            listener.on_output(make(seq, time.monotonic() - start))
            self._outputs += 1
            delay = start + seq * period - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            else:
                await anyio.lowlevel.checkpoint()


def _seed(*parts: str) -> float:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 * 2 * math.pi


def _frame_maker(
    camera: str, stream: str, dep: Deployment, objects: int, schedule: _Schedule
) -> _MakeFrame:
    config = dep.nn_config
    if isinstance(config, YoloConfig | MobileNetConfig):
        if isinstance(config, YoloConfig):
            classes = config.nn_config.num_classes
        else:
            classes = len(dep.labels) if dep.labels else _MOBILENET_CLASSES
        return _Detector(
            camera,
            stream,
            objects=objects,
            classes=classes,
            threshold=config.nn_config.confidence_threshold,
            spatial=is_depth_stream(stream),
            schedule=schedule,
        )
    return _Generic(camera, stream, dep)


class _MakeFrame:
    def __call__(self, seq: int, device_ts: float) -> Output:
        raise NotImplementedError


class _Detector(_MakeFrame):
    """Objects moving on Lissajous paths; labels below `classes`, confidence >= threshold."""

    def __init__(
        self,
        camera: str,
        stream: str,
        *,
        objects: int,
        classes: int,
        threshold: float,
        spatial: bool,
        schedule: _Schedule | None = None,
    ) -> None:
        self._camera = camera
        self._stream = stream
        self._schedule = schedule if schedule is not None else _Schedule()
        self._version = -1
        self._frame = 0  # the next frame of the schedule
        self._classes = classes
        self._phase = _seed(camera, stream)
        self._objects = objects
        self._labels = np.arange(objects, dtype=np.float32) % classes
        self._threshold = threshold
        self._spatial = spatial

    def _scheduled(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
        """The labels and confidences of the knob's next frame; None without a schedule."""
        schedule = self._schedule
        plan = schedule.plan
        if plan is None:
            return None
        if schedule.version != self._version:
            self._version, self._frame = schedule.version, 0
        index = (
            self._frame % len(plan.frames) if plan.loop else min(self._frame, len(plan.frames) - 1)
        )
        self._frame += 1
        objects = [
            item if isinstance(item, SimObject) else SimObject(label=item)
            for item in plan.frames[index]
        ]
        # what the device's network would give: known classes, at or above its threshold
        kept = [o for o in objects if o.label < self._classes and o.confidence >= self._threshold]
        return (
            np.array([o.label for o in kept], dtype=np.float32),
            np.array([o.confidence for o in kept], dtype=np.float32),
        )

    def __call__(self, seq: int, device_ts: float) -> Output:
        t = seq * 0.05 + self._phase
        scheduled = self._scheduled()
        if scheduled is None:
            labels = self._labels
            k = np.arange(self._objects, dtype=np.float32)
            confidence = self._threshold + (1.0 - self._threshold) * (0.5 + 0.5 * np.sin(t + k))
        else:
            labels, confidence = scheduled
            k = np.arange(len(labels), dtype=np.float32)
        cx = 0.5 + 0.3 * np.sin(t + k * 2.1)
        cy = 0.5 + 0.3 * np.cos(0.7 * t + k * 1.3)
        half = 0.05 + 0.02 * k
        columns = [
            labels,
            confidence,
            np.clip(cx - half, 0.0, 1.0),
            np.clip(cy - half, 0.0, 1.0),
            np.clip(cx + half, 0.0, 1.0),
            np.clip(cy + half, 0.0, 1.0),
        ]
        if self._spatial:
            z = 800.0 + 1500.0 * (0.5 + 0.5 * np.sin(0.3 * t + k))
            columns += [(cx - 0.5) * z, (cy - 0.5) * z, z]
        rows = np.stack(columns, axis=1).astype(np.float32)
        return Output(self._camera, self._stream, seq, device_ts, detections=rows)


class _Generic(_MakeFrame):
    """Every output layer of the blob, shaped as the blob declares, with slowly changing data."""

    def __init__(self, camera: str, stream: str, dep: Deployment) -> None:
        self._camera = camera
        self._stream = stream
        self._layers: list[tuple[str, tuple[int, ...], str, npt.NDArray[np.float32]]] = []
        for tensor in dep.model.info.outputs:
            size = math.prod(tensor.dims)
            base = np.sin(np.arange(size, dtype=np.float32) * 0.01).astype(np.float32)
            self._layers.append((tensor.name, tensor.dims, tensor.dtype, base))

    def __call__(self, seq: int, device_ts: float) -> Output:
        shift = np.float32(0.001 * seq)
        layers = tuple(
            RawLayer(name, dims, dtype, base + shift) for name, dims, dtype, base in self._layers
        )
        return Output(self._camera, self._stream, seq, device_ts, layers=layers)


class SimulatorBackend:
    """Simulated cameras from `[[simulator.cameras]]`; every camera is present at start."""

    name = "simulator"

    def __init__(self, specs: tuple[CameraSpec, ...]) -> None:
        self._cameras = {spec.mxid: SimulatedCamera(spec) for spec in specs}

    @property
    def cameras(self) -> Mapping[str, SimulatedCamera]:
        return self._cameras

    async def run(self, listener: CameraListener, *, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            for camera in self._cameras.values():
                tg.start_soon(camera.run, listener, name=f"camera[{camera.mxid}].simulator")
            for camera in self._cameras.values():
                listener.on_presence(camera.mxid, True)
            log.info("simulator started", cameras=list(self._cameras))
            task_status.started()
