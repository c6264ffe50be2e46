"""Shared plumbing for the benchmarks: the agent as a subprocess, MQTT watchers, tables.

Everything runs on loopback against a mosquitto started here and stopped by PID. A benchmark
raises `BenchError` when it cannot run; a slow result is a row marked MISSED, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiomqtt
import anyio
import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import SimulatedCamera, load_config
from agent.messages import CameraStatus, Event
from agent.topics import Topics
from tests.brokers import BrokerUnavailable, mosquitto_path, run_broker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

    from tests.brokers import Broker

__all__ = [
    "BLOBS",
    "PREFIX",
    "YOLO",
    "AgentProcess",
    "BenchError",
    "Row",
    "Watcher",
    "agent_process",
    "bench_broker",
    "machine",
    "mxids",
    "percentile",
    "print_table",
    "run_async",
    "watch",
    "workdir",
    "write_config",
    "yolo",
]

REPO: Final = Path(__file__).resolve().parent.parent
BLOBS: Final = REPO / "tests" / "data" / "blobs"
PREFIX: Final = "oakbench"
# tests/data/blobs/yolo_tiny.blob is shaped like YOLOv3-tiny: 80 classes, 3 anchors per cell
YOLO: Final[dict[str, Any]] = {
    "type": "YOLO",
    "nn_config": {
        "num_classes": 80,
        "anchors": [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319],
        "anchor_masks": {"side26": [0, 1, 2], "side13": [3, 4, 5]},
    },
}
WAIT: Final = 30.0  # upper bound for any single wait
_STOP_SECONDS: Final = 15.0
_KEEP: Final = 64 * 1024
_TICKS: Final = os.sysconf("SC_CLK_TCK")
_T = TypeVar("_T")
_event_decoder: Final = msgspec.json.Decoder(Event)
_status_decoder: Final = msgspec.json.Decoder(CameraStatus)


class BenchError(Exception):
    """The benchmark could not run (no broker, the agent died, a wait timed out)."""


def yolo(confidence: float = 0.5) -> dict[str, Any]:
    """A YOLO nn_config; a different threshold is a different network (forces a restart)."""
    options = {**YOLO["nn_config"], "confidence_threshold": round(confidence, 4)}
    return {"type": "YOLO", "nn_config": options}


def mxids(count: int) -> list[str]:
    return [f"BENCH{i:02d}" for i in range(count)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the maximum."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a result table; `met` is None for numbers that have no target."""

    metric: str
    measured: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: ""}[self.met]


def print_table(title: str, rows: Sequence[Row], notes: Sequence[str] = ()) -> None:
    header = ("metric", "measured", "baseline", "ratio", "target", "")
    cells = [
        header,
        *((r.metric, r.measured, r.baseline, r.ratio, r.target, r.verdict) for r in rows),
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for i, line in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths).rstrip())
    for note in notes:
        print(f"  * {note}")
    sys.stdout.flush()


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    binary = mosquitto_path()
    mosquitto = "not installed"
    if binary is not None:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
        mosquitto = (
            (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"
        )
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "mosquitto": mosquitto,
        "kernel": platform.release(),
    }


# --- broker, config, the agent process ---------------------------------------------------


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"oak-bench-{name}-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def bench_broker(root: Path) -> Iterator[Broker]:
    """mosquitto on a free loopback port (nodelay, 100 k queued messages), stopped by PID."""
    try:
        with run_broker("mosquitto", root / "broker") as broker:
            yield broker
    except BrokerUnavailable as exc:
        raise BenchError(f"cannot start mosquitto: {exc}") from exc


def supports_objects() -> bool:
    """True once the simulator has the `objects` (detections per frame) knob."""
    return "objects" in SimulatedCamera.__struct_fields__


def write_config(
    root: Path,
    broker: Broker,
    *,
    cameras: Sequence[str],
    fps: float = 30.0,
    boot_seconds: float = 0.2,
    objects: int | None = None,
) -> tuple[Path, Topics]:
    """A TOML config for the agent under `root`; returns its path and the agent's topics."""
    agent_id = f"bench-{uuid.uuid4().hex[:8]}"
    lines = [
        "[agent]",
        f'id = "{agent_id}"',
        f'state_dir = "{root / "state"}"',
        "",
        "[mqtt]",
        f'host = "{broker.host}"',
        f"port = {broker.port}",
        f'prefix = "{PREFIX}"',
        f'protocol = "{broker.protocol}"',
        "reconnect_min = 0.1",
        "reconnect_max = 1.0",
        "publish_timeout = 5.0",
    ]
    for mxid in cameras:
        lines += [
            "",
            "[[simulator.cameras]]",
            f'mxid = "{mxid}"',
            'sensors = { CAM_A = "color", CAM_B = "mono", CAM_C = "mono" }',
            'stereo = [["CAM_B", "CAM_C"]]',
            f"boot_seconds = {boot_seconds}",
            f"fps = {fps}",
        ]
        if objects is not None and supports_objects():
            lines.append(f"objects = {objects}")
    path = root / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    load_config(path)  # fail here, with the reason, rather than in the subprocess
    return path, Topics.for_agent(PREFIX, agent_id)


def run_async(func: Callable[[], Awaitable[_T]]) -> _T:
    """anyio.run, with a BenchError or MqttError raised in a task group surfaced as BenchError."""
    try:
        return anyio.run(func)
    except BaseExceptionGroup as group:
        bench = group.subgroup(BenchError)
        if bench is not None:
            raise _first(bench) from group
        mqtt = group.subgroup(aiomqtt.MqttError)
        if mqtt is not None:
            raise BenchError(f"MQTT failed: {_first(mqtt)}") from group
        raise
    except aiomqtt.MqttError as exc:
        raise BenchError(f"MQTT failed: {exc}") from exc


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads) from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"process {pid} is gone") from exc
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def status_kib(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status, e.g. VmRSS or VmHWM (peak RSS)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"process {pid} is gone") from exc
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    if found is None:
        raise BenchError(f"no {key} in /proc/{pid}/status")
    return int(found.group(1))


@dataclass
class AgentProcess:
    """`oak-agent run` in its own process; CPU and memory read from /proc."""

    process: subprocess.Popen[bytes]
    log: Path
    started: float  # perf_counter just before the process was spawned

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"the agent exited with code {self.process.returncode}:\n{self.log_tail()}"
            )

    def cpu(self) -> float:
        self.check()
        return cpu_seconds(self.pid)

    def kib(self, key: str) -> int:
        self.check()
        return status_kib(self.pid, key)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def agent_argv(config: Path, *, profile: Path | None = None) -> list[str]:
    """The command line of the real agent; under cProfile when `profile` is given."""
    if profile is not None:
        head = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "agent.cli"]
    else:
        script = Path(sys.executable).with_name("oak-agent")
        head = [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]
    return [*head, "--log-level", "warning", "--log-format", "json", "run", "--config", str(config)]


def bytecode_env(*, warm: bool = True) -> dict[str, str]:
    """The environment for a spawned Python process.

    warm: bytecode is cached in a private folder (as after a normal install, which compiles
    it); without it, whatever the calling environment does (PYTHONDONTWRITEBYTECODE may make
    every start compile every module).
    """
    env = dict(os.environ)
    if warm:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "oak-bench-pycache")
    return env


@contextlib.contextmanager
def agent_process(
    argv: list[str], log: Path, *, env: dict[str, str] | None = None
) -> Iterator[AgentProcess]:
    """Spawn the agent; on exit SIGTERM it (clean shutdown), SIGKILL after a bound."""
    with log.open("wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env if env is not None else bytecode_env(),
        )
    agent = AgentProcess(process, log, started)
    try:
        yield agent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


# --- watching the agent over MQTT --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    at: float  # perf_counter on arrival
    topic: str
    payload: bytes


@dataclass
class Watcher:
    """Records the agent's events, availability and camera status as they arrive."""

    client: aiomqtt.Client
    topics: Topics
    seen: list[Seen] = field(default_factory=list)
    events: list[tuple[float, Event]] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def _record(self) -> None:
        async for message in self.client.messages:
            at = time.perf_counter()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            topic = message.topic.value
            # large payloads are only ever timed, not read back: do not keep them
            self.seen.append(Seen(at, topic, payload if len(payload) <= _KEEP else b""))
            if topic == self.topics.events:
                self.events.append((at, _event_decoder.decode(payload)))
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(self, find: Callable[[], _T | None], what: str, bound: float = WAIT) -> _T:
        with anyio.move_on_after(bound):
            while True:
                changed = self._changed
                found = find()
                if found is not None:
                    return found
                await changed.wait()
        raise BenchError(f"timed out after {bound:.0f} s waiting for {what}")

    def latest(self, topic: str) -> Seen | None:
        return next((s for s in reversed(self.seen) if s.topic == topic), None)

    def arrival(self, topic: str) -> Seen | None:
        return next((s for s in self.seen if s.topic == topic), None)

    def first(self, topic: str, payload: bytes) -> Seen | None:
        return next((s for s in self.seen if s.topic == topic and s.payload == payload), None)

    def status(self, mxid: str) -> CameraStatus | None:
        seen = self.latest(self.topics.camera_status(mxid))
        return None if seen is None else _status_decoder.decode(seen.payload)

    def event(self, request_id: str, state: str) -> tuple[float, Event] | None:
        return next(
            ((at, e) for at, e in self.events if e.request_id == request_id and e.state == state),
            None,
        )

    def terminal(self, request_id: str) -> tuple[float, Event] | None:
        return next(
            ((at, e) for at, e in self.events if e.request_id == request_id and e.terminal), None
        )

    async def online(self) -> float:
        """Wait for the retained `online`; its arrival time."""
        seen = await self.wait_for(
            lambda: self.first(self.topics.availability, b"online"), "agent online"
        )
        return seen.at

    async def cameras_online(self, cameras: Sequence[str]) -> float:
        """Wait until every camera said `online`; the arrival time of the last one."""

        def find() -> float | None:
            found = [self.first(self.topics.camera_availability(m), b"online") for m in cameras]
            if any(s is None for s in found):
                return None
            return max(s.at for s in found if s is not None)

        return await self.wait_for(find, "every camera online")

    async def deploy(
        self,
        mxid: str,
        stream: str,
        body: dict[str, Any],
        *,
        encoding: str = "json",
        payload: bytes | None = None,
    ) -> float:
        """Publish a deploy command (QoS 1); perf_counter just before publishing."""
        if payload is None:
            payload = (
                msgspec.json.encode(body) if encoding == "json" else msgspec.msgpack.encode(body)
            )
        topic = self.topics.command(mxid, stream, "deploy")
        sent = time.perf_counter()
        await self.client.publish(topic, payload, qos=1, timeout=WAIT)
        return sent

    async def outcome(self, request_id: str) -> tuple[float, Event]:
        return await self.wait_for(lambda: self.terminal(request_id), f"{request_id} to finish")


@contextlib.asynccontextmanager
async def watch(
    broker: Broker, topics: Topics, *, extra: Sequence[str] = ()
) -> AsyncIterator[Watcher]:
    """Subscribe before the agent starts, so nothing it says is missed."""
    protocol = aiomqtt.ProtocolVersion.V5 if broker.mqtt5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=protocol,
        identifier=f"bench-watch-{uuid.uuid4().hex[:8]}",
        # paho leaves Nagle on; the bench's own client must not add 40 ms stalls to latencies
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        for topic in (
            topics.events,
            topics.availability,
            f"{topics.base}/cameras/+/status",
            f"{topics.base}/cameras/+/availability",
            *extra,
        ):
            await client.subscribe(topic, qos=1)
        watcher = Watcher(client, topics)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher._record, name="bench.watcher")
            yield watcher
            tg.cancel_scope.cancel()


# --- counting what arrives, and the baseline publishers -----------------------------------


class _SeqOnly(msgspec.Struct):
    seq: int = 0


_seq_decoder: Final = msgspec.json.Decoder(_SeqOnly)


class Counter:
    """A paho subscriber on its own thread that counts messages (and seq numbers)."""

    def __init__(self, broker: Broker, topic: str, *, track_seq: bool = False) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.last_seq: dict[str, int] = {}
        self.sample = b""
        self._track_seq = track_seq
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-count-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        info = self._client.subscribe(topic, qos=0)
        deadline = time.monotonic() + WAIT
        while not self._client.is_connected() or info[0] != paho.MQTT_ERR_SUCCESS:
            if time.monotonic() > deadline:
                raise BenchError("the counting subscriber could not connect")
            time.sleep(0.01)
        time.sleep(0.2)  # the SUBACK; paho has no blocking subscribe

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
            self.sample = bytes(msg.payload)
        self.count += 1
        self.last = now
        if self._track_seq:
            self.last_seq[msg.topic] = _seq_decoder.decode(msg.payload).seq

    def reset(self) -> None:
        self.count = 0
        self.last_seq = {}

    def offered(self) -> int:
        return sum(self.last_seq.values())

    def drain(self, quiet: float = 0.5, bound: float = 20.0) -> None:
        """Wait until nothing has arrived for `quiet` seconds (at most `bound`)."""
        deadline = time.monotonic() + bound
        seen = -1
        while time.monotonic() < deadline and seen != self.count:
            seen = self.count
            time.sleep(quiet)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@contextlib.contextmanager
def counter(broker: Broker, topic: str, *, track_seq: bool = False) -> Iterator[Counter]:
    sub = Counter(broker, topic, track_seq=track_seq)
    try:
        yield sub
    finally:
        sub.close()


@dataclass(frozen=True, slots=True)
class Flood:
    """What one baseline publisher did, and what the counting subscriber saw of it."""

    mode: str
    published: int
    seconds: float
    cpu: float
    delivered: int
    delivered_seconds: float

    @property
    def rate(self) -> float:
        """Delivered messages per second, measured at the subscriber."""
        return self.delivered / self.delivered_seconds if self.delivered_seconds > 0 else 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.delivered / self.cpu if self.cpu > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.published * 1e6 if self.published else float("nan")


def run_flood(
    broker: Broker,
    sub: Counter,
    mode: str,
    payload: Path,
    *,
    topic: str,
    seconds: float,
    rate: float = 0.0,
) -> Flood:
    """Run one baseline publisher process to completion (bounded) and count its messages."""
    sub.reset()
    argv = [
        sys.executable,
        "-m",
        "bench._flood",
        mode,
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--topic",
        topic,
        "--payload-file",
        str(payload),
        "--seconds",
        str(seconds),
        "--rate",
        str(rate),
    ]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
            cwd=REPO,
            env=bytecode_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the {mode} baseline did not finish") from exc
    if done.returncode != 0:
        raise BenchError(f"the {mode} baseline failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    sub.drain()
    return Flood(
        mode=mode,
        published=int(result["published"]),
        seconds=float(result["seconds"]),
        cpu=float(result["cpu"]),
        delivered=sub.count,
        delivered_seconds=sub.last - sub.first,
    )
