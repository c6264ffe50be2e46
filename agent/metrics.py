"""Optional Prometheus exposition of the health stats (`[metrics] listen`), off by default.

The same figures as `{base}/stats` and `{base}/cameras/{mxid}/stats`, taken fresh at each
scrape, with labels camera / stream. Served on the event loop by a minimal HTTP/1.0 responder
(GET /metrics only), so a scrape reads the agent's state from the loop that changes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import anyio
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.config import split_listen

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from anyio.abc import SocketStream, TaskStatus
    from prometheus_client.metrics_core import Metric

    from agent.health import HealthMonitor

__all__ = ["MetricsServer", "respond"]

log = structlog.get_logger(__name__)

_MAX_HEAD: Final = 8192  # a scrape's request head is a few hundred bytes
_READ_SECONDS: Final = 5.0
_CONNECTIONS: Final = 4  # scrapers served at once; more wait in the backlog


def respond(head: bytes, metrics: Callable[[], bytes]) -> bytes:
    """The whole HTTP response to a request head: the metrics for GET /metrics, else an error."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(line) != 3 or not line[2].startswith(b"HTTP/"):
        return _response(b"400 Bad Request", b"text/plain", b"bad request\n")
    method, target = line[0], line[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return _response(b"404 Not Found", b"text/plain", b"only /metrics is here\n")
    if method not in (b"GET", b"HEAD"):
        return _response(b"405 Method Not Allowed", b"text/plain", b"GET only\n")
    response = _response(b"200 OK", CONTENT_TYPE_LATEST.encode(), metrics())
    if method == b"HEAD":
        return response[: response.index(b"\r\n\r\n") + 4]
    return response


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.0 " + status + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n" + body
    )  # fmt: skip


class _Figures(Collector):
    """The stats as metric families, built from `HealthMonitor` at each scrape."""

    def __init__(self, health: HealthMonitor) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        agent, cameras = self._health.snapshot()
        yield _gauge("oak_agent_uptime_seconds", "Seconds since the agent started", agent.uptime)
        if agent.cpu_percent is not None:
            yield _gauge("oak_agent_cpu_percent", "CPU % of one core", agent.cpu_percent)
        if agent.rss_bytes is not None:
            yield _gauge("oak_agent_rss_bytes", "Resident set size", agent.rss_bytes)
        yield _gauge(
            "oak_agent_loop_lag_max_ms",
            "Worst event-loop lag since the last published stats",
            agent.loop_lag_max_ms,
        )
        yield CounterMetricFamily(
            "oak_agent_messages_published",
            "MQTT messages published",
            value=agent.messages_published,
        )
        yield CounterMetricFamily(
            "oak_agent_detections_dropped",
            "Detection messages dropped (disconnected or behind)",
            value=agent.detections_dropped,
        )
        commands = CounterMetricFamily(
            "oak_agent_commands", "Commands handled, by outcome", labels=["outcome"]
        )
        for outcome in ("succeeded", "failed", "rejected", "superseded"):
            commands.add_metric([outcome], getattr(agent.commands, outcome))
        yield commands

        uptime = GaugeMetricFamily(
            "oak_camera_uptime_seconds", "Seconds since the camera booted", labels=["camera"]
        )
        temperature = GaugeMetricFamily(
            "oak_camera_temperature_celsius", "Chip temperature", labels=["camera", "sensor"]
        )
        used = GaugeMetricFamily(
            "oak_camera_memory_used_bytes", "Device memory in use", labels=["camera", "memory"]
        )
        total = GaugeMetricFamily(
            "oak_camera_memory_total_bytes", "Device memory in all", labels=["camera", "memory"]
        )
        cpu = GaugeMetricFamily(
            "oak_camera_leon_cpu_percent", "Leon CPU load", labels=["camera", "cpu"]
        )
        fps = GaugeMetricFamily(
            "oak_stream_fps", "NN results per second", labels=["camera", "stream"]
        )
        dropped = CounterMetricFamily(
            "oak_stream_dropped", "NN results not published", labels=["camera", "stream"]
        )
        for mxid, camera in cameras.items():
            if camera.uptime is not None:
                uptime.add_metric([mxid], camera.uptime)
            for sensor in camera.temperature.__struct_fields__:
                if (value := getattr(camera.temperature, sensor)) is not None:
                    temperature.add_metric([mxid, sensor], value)
            for memory in camera.memory.__struct_fields__:
                use = getattr(camera.memory, memory)
                if use.used is not None:
                    used.add_metric([mxid, memory], use.used)
                if use.total is not None:
                    total.add_metric([mxid, memory], use.total)
            for name in camera.leon_cpu.__struct_fields__:
                if (load := getattr(camera.leon_cpu, name)) is not None:
                    cpu.add_metric([mxid, name], load)
            for stream, figures in camera.streams.items():
                if figures.fps is not None:
                    fps.add_metric([mxid, stream], figures.fps)
                dropped.add_metric([mxid, stream], figures.dropped)
        yield from (uptime, temperature, used, total, cpu, fps, dropped)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class MetricsServer:
    """Serves GET /metrics on `listen` until cancelled."""

    def __init__(self, listen: str, health: HealthMonitor) -> None:
        self._host, self._port = split_listen(listen)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Figures(health))
        self._limiter = anyio.CapacityLimiter(_CONNECTIONS)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        except OSError as exc:  # configured, so wanted: the agent does not start without it
            log.error("metrics cannot listen", host=self._host, port=self._port, error=str(exc))  # noqa: TRY400
            raise
        log.info("metrics listening", host=self._host, port=self._port)
        async with listener:
            task_status.started()
            await listener.serve(self._serve)

    async def _serve(self, stream: SocketStream) -> None:
        async with self._limiter, stream:
            head = b""
            with anyio.move_on_after(_READ_SECONDS):
                while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                    try:
                        head += await stream.receive(_MAX_HEAD)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            if b"\r\n\r\n" not in head:
                return  # too slow, too long or cut off: nothing to answer
            try:
                await stream.send(respond(head, lambda: generate_latest(self._registry)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
