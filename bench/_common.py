"""Shared plumbing for the benchmarks: the agent as a subprocess, MQTT watchers, tables.

Everything runs on loopback against a mosquitto started here and stopped by PID. A benchmark
raises `BenchError` when it cannot run; a slow result is a row marked MISSED, never an error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import pstats
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
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import aiomqtt
import anyio
import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.messages import CameraStatus, Event
from agent.topics import Topics
from tests.brokers import BrokerUnavailable, mosquitto_path, run_broker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

    from _typeshed import DataclassInstance

    from tests.brokers import Broker

__all__ = [
    "BLOBS",
    "PREFIX",
    "REPO",
    "YOLO",
    "BenchError",
    "Counter",
    "Flood",
    "Process",
    "Row",
    "Site",
    "Table",
    "Watcher",
    "Window",
    "agent_argv",
    "bench_site",
    "bytecode_env",
    "cli",
    "machine",
    "median",
    "mxids",
    "percentile",
    "python_output",
    "run_async",
    "spawned",
    "top_functions",
    "watch",
    "window",
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
_O = TypeVar("_O", bound="DataclassInstance")
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


@dataclass(frozen=True, slots=True)
class Table:
    """What a benchmark found: its rows, notes on how, and anything to show below (a profile)."""

    title: str
    rows: Sequence[Row]
    notes: Sequence[str] = ()
    after: str = ""

    def print(self) -> None:
        header = ("metric", "measured", "baseline", "ratio", "target", "")
        cells = [
            header,
            *((r.metric, r.measured, r.baseline, r.ratio, r.target, r.verdict) for r in self.rows),
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        print(f"\n== {self.title}")
        for i, line in enumerate(cells):
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths).rstrip())
        for note in self.notes:
            print(f"  * {note}")
        if self.after:
            print(self.after)
        sys.stdout.flush()


def top_functions(profile: Path | None, limit: int = 25) -> str:
    """The agent's cProfile (--profile), top functions by own time; "" without one."""
    if profile is None:
        return ""
    out = io.StringIO()
    out.write(f"\n== cProfile of the agent ({profile}), top {limit} by own time\n")
    pstats.Stats(str(profile), stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()


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


# --- command line -------------------------------------------------------------------------


def cli(name: str, measure: Callable[[_O], Table], options: type[_O], doc: str | None) -> int:
    """`python -m bench.NAME [--field value ...]`: exit 1 only when the benchmark could not run."""
    try:
        measure(
            parse_options(options, sys.argv[1:], prog=f"python -m bench.{name}", doc=doc)
        ).print()
    except BenchError as exc:
        print(f"{name} benchmark could not run: {exc}", file=sys.stderr)
        return 1
    return 0


def parse_options(cls: type[_O], argv: list[str] | None, *, prog: str, doc: str | None) -> _O:
    """Every field of the options dataclass is a flag: ints, floats, `1,2,4` tuples, paths."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = cls()
    for option in dataclasses.fields(cls):
        default = getattr(defaults, option.name)
        flag = "--" + option.name.replace("_", "-")
        text = option.metadata.get("help", "")
        if isinstance(default, tuple):
            shown = ",".join(map(str, default))
            parser.add_argument(flag, type=_numbers, default=default, help=f"{text} ({shown})")
        elif default is None:  # the optional fields are output files
            parser.add_argument(flag, type=Path, help=text)
        else:
            parser.add_argument(
                flag, type=type(default), default=default, help=f"{text} ({default})"
            )
    return cls(**vars(parser.parse_args(argv)))


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(","))


# --- the bench's broker, the agent's config, processes -----------------------------------


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads) from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"process {pid} is gone") from exc
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def status_kib(status: str, key: str) -> int:
    """A `kB` line of a /proc/<pid>/status text, e.g. VmRSS or VmHWM (peak RSS)."""
    found = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
    if found is None:
        raise BenchError(f"no {key} in /proc/<pid>/status")
    return int(found.group(1))


@dataclass
class Process:
    """A process the benchmark spawned; its CPU and memory read from /proc."""

    popen: subprocess.Popen[bytes]
    log: Path
    started: float  # perf_counter just before the process was spawned
    what: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.what} exited with code {self.popen.returncode}:\n{self.log_tail()}"
            )

    def cpu(self) -> float:
        self.check()
        return cpu_seconds(self.pid)

    def kib(self, key: str) -> int:
        self.check()
        try:
            return status_kib(Path(f"/proc/{self.pid}/status").read_text(), key)
        except OSError as exc:
            raise BenchError(f"{self.what} is gone") from exc

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def spawned(
    argv: list[str], log: Path, *, env: dict[str, str] | None = None, what: str = "the agent"
) -> Iterator[Process]:
    """Spawn a process, output to `log`; on exit SIGTERM it (clean stop), SIGKILL after a bound."""
    with log.open("wb") as out:
        started = time.perf_counter()
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env if env is not None else bytecode_env(),
        )
    try:
        yield Process(popen, log, started, what)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=5)


def python_output(argv: list[str], what: str, *, timeout: float = 120.0) -> str:
    """Run `python ARGV` to completion (bounded, warm bytecode) and return what it printed."""
    try:
        done = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
            env=bytecode_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"{what} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def agent_argv(config: Path, *, profile: Path | None = None) -> list[str]:
    """The command line of the real agent; under cProfile when `profile` is given."""
    if profile is not None:
        head = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "agent.cli"]
    else:
        script = Path(sys.executable).with_name("oak-agent")
        head = [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]
    return [*head, "--log-level", "warning", "--log-format", "json", "run", "--config", str(config)]


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


@contextlib.contextmanager
def bench_site(name: str) -> Iterator[Site]:
    """A temporary folder and mosquitto on a free loopback port (nodelay, 100 k queued
    messages), both gone on exit; the broker is stopped by PID."""
    with tempfile.TemporaryDirectory(prefix=f"oak-bench-{name}-") as tmp:
        root = Path(tmp)
        try:
            with run_broker("mosquitto", root / "broker") as broker:
                yield Site(root, broker)
        except BrokerUnavailable as exc:
            raise BenchError(f"cannot start mosquitto: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Site:
    """Where a benchmark runs: its temporary folder and its own broker."""

    root: Path
    broker: Broker

    def config(
        self,
        *,
        cameras: Sequence[str],
        fps: float = 30.0,
        boot_seconds: float = 0.2,
        objects: int | None = None,
        mqtt: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> tuple[Path, Topics]:
        """A TOML config for a new agent in a new folder; its path and the agent's topics.

        `mqtt`: more lines for the `[mqtt]` section (`receive_maximum = 8`); `extra`: lines
        added at the end (`[security]`)."""
        agent_id = f"bench-{uuid.uuid4().hex[:8]}"
        folder = self.root / agent_id
        folder.mkdir()
        lines = [
            "[agent]",
            f'id = "{agent_id}"',
            f'state_dir = "{folder / "state"}"',
            "",
            "[mqtt]",
            f'host = "{self.broker.host}"',
            f"port = {self.broker.port}",
            f'prefix = "{PREFIX}"',
            f'protocol = "{self.broker.protocol}"',
            "reconnect_min = 0.1",
            "reconnect_max = 1.0",
            "publish_timeout = 5.0",
            *mqtt,
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
            if objects is not None:
                lines.append(f"objects = {objects}")
        lines += ["", *extra]
        path = folder / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        load_config(path)  # fail here, with the reason, rather than in the subprocess
        return path, Topics.for_agent(PREFIX, agent_id)

    def run_agent(
        self,
        config: Path,
        topics: Topics,
        job: Callable[[Watcher, Process], Awaitable[_T]],
        *,
        cameras: Sequence[str] = (),
        profile: Path | None = None,
        extra: Sequence[str] = (),
        argv: Sequence[str] = (),
    ) -> _T:
        """`oak-agent run` (or `argv`): wait until it and `cameras` are online, run `job`,
        stop the agent."""
        command = list(argv) or agent_argv(config, profile=profile)
        with spawned(command, config.parent / "agent.log") as agent:

            async def run() -> _T:
                async with watch(self.broker, topics, extra=extra) as watcher:
                    await watcher.online()
                    if cameras:
                        await watcher.cameras_online(cameras)
                    return await job(watcher, agent)

            return run_async(run)

    def count_detections(self, topics: Topics, *, track_seq: bool = False) -> Counter:
        """A subscriber counting every detection message of the agent; close() it."""
        return Counter(self.broker, topics.detections("+", "+"), track_seq=track_seq)

    def floods(
        self,
        payload: bytes,
        modes: Sequence[str],
        *,
        seconds: float,
        rate: float = 0.0,
        objects: int = 3,
    ) -> dict[str, Flood]:
        """Run each baseline publisher (bench._flood) in turn, counted by one subscriber."""
        path = self.root / "flood.payload"
        path.write_bytes(payload)
        with Counter(self.broker, f"{PREFIX}/flood/#") as sub:
            return {
                mode: _flood(
                    self.broker, sub, mode, path, seconds=seconds, rate=rate, objects=objects
                )
                for mode in modes
            }


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

    async def succeeded(self, request_id: str) -> float:
        """The arrival of the request's terminal event; BenchError unless it is `succeeded`."""
        at, event = await self.outcome(request_id)
        if event.state != "succeeded":
            raise BenchError(f"{request_id} ended {event.state}: {event.error}")
        return at


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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Window:
    """What a counting subscriber saw and what the agent's process spent, over one window."""

    delivered: int
    offered: int  # frames the simulator numbered (seq), when the subscriber tracks them
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds

    @property
    def offered_rate(self) -> float:
        return self.offered / self.seconds

    @property
    def drop_share(self) -> float:
        return max(0, self.offered - self.delivered) / self.offered if self.offered else 0.0

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.delivered * 1e6 if self.delivered else float("nan")

    @property
    def per_cpu_second(self) -> float:
        return self.delivered / self.cpu if self.cpu > 0 else 0.0


async def window(agent: Process, sub: Counter, seconds: float) -> Window:
    """Count messages and the agent's CPU over `seconds`."""
    count0, offered0, cpu0, t0 = sub.count, sub.offered(), agent.cpu(), time.perf_counter()
    await anyio.sleep(seconds)
    count1, offered1, cpu1, t1 = sub.count, sub.offered(), agent.cpu(), time.perf_counter()
    return Window(count1 - count0, offered1 - offered0, t1 - t0, cpu1 - cpu0)


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
    def cpu_percent(self) -> float:
        return 100 * self.cpu / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.delivered / self.cpu if self.cpu > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.published * 1e6 if self.published else float("nan")


def _flood(
    broker: Broker,
    sub: Counter,
    mode: str,
    payload: Path,
    *,
    seconds: float,
    rate: float,
    objects: int,
) -> Flood:
    """Run one baseline publisher process to completion (bounded) and count its messages."""
    sub.reset()
    options = {
        "--host": broker.host,
        "--port": broker.port,
        "--topic": f"{PREFIX}/flood/{mode}",
        "--payload-file": payload,
        "--seconds": seconds,
        "--rate": rate,
        "--objects": objects,
    }
    argv = ["-m", "bench._flood", mode, *(str(x) for item in options.items() for x in item)]
    output = python_output(argv, f"the {mode} baseline", timeout=seconds + 60)
    result = json.loads(output.strip().splitlines()[-1])
    sub.drain()
    return Flood(
        mode=mode,
        published=int(result["published"]),
        seconds=float(result["seconds"]),
        cpu=float(result["cpu"]),
        delivered=sub.count,
        delivered_seconds=sub.last - sub.first,
    )
