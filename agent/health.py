"""Health stats: the retained `{base}/stats` (the agent) and `{base}/cameras/{mxid}/stats`.

Published every `agent.stats_interval` and when `{base}/stats/request` asks; the agent's
figures come from the process (/proc), a loop-lag probe and the counters the link, the
reporter and the cameras keep.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Final

import anyio

from agent.messages import AgentHealth, CameraHealth, DeviceMemory, MemoryUse, StreamHealth

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping

    from anyio.abc import TaskStatus

    from agent.cameras.base import Camera
    from agent.mqtt import LinkStats
    from agent.reporter import Reporter

__all__ = ["HealthMonitor", "ProcessSampler", "percent", "rss_bytes", "with_percent"]

_LAG_PROBE_SECONDS: Final = 0.1
# a stats request within this of the last sample reuses its rates (fps, CPU %): too short a
# window gives noise
_MIN_WINDOW: Final = 1.0


def rss_bytes() -> int | None:
    """The process's resident set size, or None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def percent(used: int | None, total: int | None) -> float | None:
    if used is None or not total:
        return None
    return round(100.0 * used / total, 2)


def with_percent(memory: DeviceMemory) -> DeviceMemory:
    def fill(use: MemoryUse) -> MemoryUse:
        return MemoryUse(used=use.used, total=use.total, percent=percent(use.used, use.total))

    return DeviceMemory(
        ddr=fill(memory.ddr),
        cmx=fill(memory.cmx),
        leon_css_heap=fill(memory.leon_css_heap),
        leon_mss_heap=fill(memory.leon_mss_heap),
    )


class ProcessSampler:
    """CPU % of one core between samples, from the process's CPU time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock()
        self._cpu = time.process_time()
        self.cpu_percent: float | None = None

    def sample(self) -> float | None:
        now, cpu = self._clock(), time.process_time()
        elapsed = now - self._at
        if elapsed >= _MIN_WINDOW or self.cpu_percent is None:
            if elapsed > 0:
                self.cpu_percent = round(100.0 * (cpu - self._cpu) / elapsed, 2)
            self._at, self._cpu = now, cpu
        return self.cpu_percent


class _Rates:
    """Results per second of each (camera, stream), between samples at least 1 s apart."""

    def __init__(self, counts: Mapping[tuple[str, str], int]) -> None:
        self._counts = counts
        self._at = time.monotonic()
        self._before: dict[tuple[str, str], int] = dict(counts)
        self.fps: dict[tuple[str, str], float] = {}

    def sample(self) -> None:
        now = time.monotonic()
        elapsed = now - self._at
        if elapsed < _MIN_WINDOW:
            return
        current = dict(self._counts)
        self.fps = {
            key: round((count - self._before.get(key, 0)) / elapsed, 2)
            for key, count in current.items()
        }
        self._at, self._before = now, current


class HealthMonitor:
    """Publishes the stats on a timer and on request; probes the event loop's lag."""

    def __init__(
        self,
        reporter: Reporter,
        link: LinkStats,
        cameras: Callable[[], Mapping[str, Camera]],
        deployed: Callable[[str], Collection[str]],
        *,
        interval: float,
    ) -> None:
        self._reporter = reporter
        self._link = link
        self._cameras = cameras
        self._deployed = deployed  # the streams of a camera that run (or are to run) an NN
        self._interval = interval
        self._started = time.monotonic()
        self._process = ProcessSampler()
        self._rates = _Rates(reporter.results)
        self._lag_max = 0.0
        self._requested = anyio.Event()

    def request(self) -> None:
        """Publish the stats now (`{base}/stats/request`)."""
        self._requested.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._probe_lag, name="stats.lag_probe")
            task_status.started()
            self.publish()  # a dashboard gets figures at once, not after the first interval
            while True:
                with anyio.move_on_after(self._interval):
                    await self._requested.wait()
                self._requested = anyio.Event()
                self.publish()

    async def _probe_lag(self) -> None:
        while True:
            before = time.monotonic()
            await anyio.sleep(_LAG_PROBE_SECONDS)
            lag = time.monotonic() - before - _LAG_PROBE_SECONDS
            self._lag_max = max(self._lag_max, lag)

    def snapshot(self) -> tuple[AgentHealth, dict[str, CameraHealth]]:
        """The agent's and every camera's figures as of now."""
        self._rates.sample()
        now = time.time()
        cameras = {c.mxid: self.camera(c, now) for c in self._cameras().values()}
        return self.agent(now), cameras

    def publish(self) -> None:
        agent, cameras = self.snapshot()
        for mxid, camera in cameras.items():
            self._reporter.camera_health(mxid, camera)
        self._reporter.agent_health(agent)
        self._lag_max = 0.0  # the worst lag since the previous stats

    def camera(self, camera: Camera, now: float) -> CameraHealth:
        health = camera.health
        mxid = camera.mxid
        streams = set(self._deployed(mxid)) | set(health.dropped)
        return CameraHealth(
            ts=now,
            uptime=None if health.uptime is None else round(health.uptime, 3),
            temperature=health.temperature,
            memory=with_percent(health.memory),
            leon_cpu=health.leon_cpu,
            streams={
                stream: StreamHealth(
                    fps=self._rates.fps.get((mxid, stream)),
                    dropped=health.dropped.get(stream, 0) + self._reporter.dropped[mxid, stream],
                )
                for stream in sorted(streams)
            },
        )

    def agent(self, now: float) -> AgentHealth:
        link = self._link
        return AgentHealth(
            ts=now,
            uptime=round(time.monotonic() - self._started, 3),
            cpu_percent=self._process.sample(),
            rss_bytes=rss_bytes(),
            loop_lag_max_ms=round(self._lag_max * 1000.0, 3),
            messages_published=link.events_sent + link.detections_sent + link.retained_sent,
            detections_dropped=link.detections_dropped_disconnected
            + link.detections_dropped_backpressure,
            commands=self._reporter.command_counts(),
        )
