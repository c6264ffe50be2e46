"""Inbound flood: N commands at the agent through mosquitto. Is every one answered, and how
much memory does it take, with receive_maximum 8 and 65535 (the old unbounded way)?

    .venv/bin/python -m bench.inbound [--commands 20000 --cameras 4 --agent-source DIR]

75 % deploys carrying a 19.9 KB blob inline (26.6 KB of JSON), 25 % deletes, round-robin
over 4 streams of each camera, each with its own request_id, published at QoS 1 as fast as
mosquitto takes them. Two ways, each with a fresh broker and agent per receive_maximum:
- online: the agent runs, then the flood is published;
- offline: the agent ran once (its persistent session subscribed) and stopped, the flood is
  published and queued by the broker, then the agent starts into it.
A case ends when every command was answered (a terminal event: succeeded, superseded,
failed, rejected) or no new answer came for `--stall` seconds. Dropped events and
reconnects are counted from the agent's log; peak RSS is VmHWM from /proc by PID, of the
agent (the process started into the flood, offline) and of mosquitto. `--agent-source`
runs the agent from another source folder (e.g. `git archive <commit> agent | tar -x -C DIR`)
to measure an older version the same way. Not part of `python -m bench` (it publishes
about 530 MB per case and takes minutes).
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench._common import (
    BLOBS,
    BenchError,
    Row,
    Table,
    agent_argv,
    bench_site,
    cli,
    mxids,
    spawned,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from bench._common import Process, Site
    from tests.brokers import Broker

__all__ = ["Options", "measure"]

_STREAMS: Final = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")
_TERMINAL: Final = frozenset({"succeeded", "superseded", "failed", "rejected"})
_DROPPED: Final = frozenset(
    {"event queue full, oldest event dropped", "event queue full, report dropped"}
)
_RECONNECT: Final = "mqtt disconnected, reconnecting"
_BOUND: Final = 1800.0  # seconds: no case runs longer
_WINDOW: Final = 200  # the flood waits for the broker every this many commands
_ONLINE_WAIT: Final = 60.0


@dataclass(frozen=True, slots=True)
class Options:
    commands: int = 20_000
    cameras: int = 4
    stall: float = 60.0
    receive_maximum: tuple[int, ...] = (8, 65535)
    agent_source: Path | None = field(
        default=None,
        metadata={"help": "run the agent from this source folder (holding an `agent` package)"},
    )


class _Answer(msgspec.Struct):
    request_id: str = ""
    state: str = ""


_answer_decoder: Final = msgspec.json.Decoder(_Answer)


class _Listener:
    """A paho subscriber on its own thread: the agent's availability and its answers."""

    def __init__(self, broker: Broker, base: str) -> None:
        self.answers: dict[str, int] = {}
        self.last_answer = 0.0
        self.retained: dict[str, bytes] = {}
        self._events = f"{base}/events"
        self._lock = threading.Lock()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-answers-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        subscribed = [
            self._client.subscribe(self._events, qos=1),
            self._client.subscribe(f"{base}/availability", qos=1),
            self._client.subscribe(f"{base}/cameras/+/availability", qos=1),
        ]
        _until(
            lambda: (
                self._client.is_connected()
                and all(s[0] == paho.MQTT_ERR_SUCCESS for s in subscribed)
            ),
            "the answer listener to connect",
        )
        time.sleep(0.3)  # the SUBACKs; paho has no blocking subscribe

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if msg.topic != self._events:
            with self._lock:
                self.retained[msg.topic] = bytes(msg.payload)
            return
        answer = _answer_decoder.decode(msg.payload)
        if answer.state in _TERMINAL:
            with self._lock:
                self.answers[answer.request_id] = self.answers.get(answer.request_id, 0) + 1
                self.last_answer = time.perf_counter()

    def online(self, topics: list[str]) -> bool:
        with self._lock:
            return all(self.retained.get(t) == b"online" for t in topics)

    def forget_availability(self) -> None:
        with self._lock:
            self.retained.clear()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _until(condition: object, what: str, bound: float = _ONLINE_WAIT) -> None:
    deadline = time.monotonic() + bound
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {bound:.0f} s waiting for {what}")
        time.sleep(0.05)


def _commands(count: int, cameras: list[str], base: str) -> Iterator[tuple[str, bytes]]:
    """The flood, made as it is sent: 20,000 of them take 530 MB."""
    blob = base64.b64encode((BLOBS / "ssd_tiny.blob").read_bytes()).decode()
    for i in range(count):
        camera, stream = cameras[i % len(cameras)], _STREAMS[(i // len(cameras)) % 4]
        where = f"{base}/cameras/{camera}/streams/{stream}/nn"
        if i % 4 == 3:
            yield f"{where}/delete", msgspec.json.encode({"request_id": f"f{i}"})
        else:
            body = {"request_id": f"f{i}", "nn_config": {"type": "MobileNet"}, "model": blob}
            yield f"{where}/deploy", msgspec.json.encode(body)


def _flood(broker: Broker, commands: Iterable[tuple[str, bytes]]) -> None:
    """Publish every command at QoS 1; return once the broker has acknowledged them all."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-flood-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.max_inflight_messages_set(_WINDOW)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        _until(client.is_connected, "the flood publisher to connect")
        pending: list[paho.MQTTMessageInfo] = []
        for topic, payload in commands:
            pending.append(client.publish(topic, payload, qos=1))
            if len(pending) >= _WINDOW:  # bounds paho's own queue
                for info in pending:
                    info.wait_for_publish(_BOUND)
                pending.clear()
        for info in pending:
            info.wait_for_publish(_BOUND)
    finally:
        client.loop_stop()
        client.disconnect()


@dataclass(frozen=True, slots=True)
class _Case:
    sent: int
    answered: int
    twice: int
    dropped: int
    reconnects: int
    causes: frozenset[str]
    agent_peak_kib: int
    agent_idle_kib: int
    broker_peak_kib: int
    seconds: float


def _log_counts(logs: list[Path]) -> tuple[int, int, set[str]]:
    """Dropped events and reconnects the agent logged, and why it reconnected."""
    dropped = reconnects = 0
    causes: set[str] = set()
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                event = record.get("event")
            except (ValueError, AttributeError):
                continue
            dropped += event in _DROPPED
            if event == _RECONNECT:
                reconnects += 1
                causes.add(str(record.get("error"))[:120])
    return dropped, reconnects, causes


def _broker_peak(broker: Broker) -> int:
    status = Path(f"/proc/{broker.pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise BenchError("no VmHWM for the broker")


def _argv(config: Path, source: Path | None) -> list[str]:
    if source is None:
        return agent_argv(config)
    boot = (
        f"import sys; sys.path.insert(0, {str(source.resolve())!r}); "
        "import agent.cli; sys.exit(agent.cli.main())"
    )
    return [
        sys.executable,
        "-c",
        boot,
        "--log-level",
        "warning",
        "--log-format",
        "json",
        "run",
        "--config",
        str(config),
    ]


def _online(listener: _Listener, topics: list[str], agent: Process) -> bool:
    agent.check()  # raises when it died
    return listener.online(topics)


def _wait_answers(listener: _Listener, agent: Process, ids: int, stall: float) -> None:
    started = time.perf_counter()
    seen, changed = -1, time.perf_counter()
    while len(listener.answers) < ids:
        agent.check()
        now = time.perf_counter()
        if len(listener.answers) != seen:
            seen, changed = len(listener.answers), now
        if now - changed > stall or now - started > _BOUND:
            return
        time.sleep(0.25)


def _case(site: Site, options: Options, receive_maximum: int, *, offline: bool) -> _Case:
    cameras = mxids(options.cameras)
    config, topics = site.config(
        cameras=cameras, fps=2.0, mqtt=[f"receive_maximum = {receive_maximum}"]
    )
    sent = options.commands
    ready = [topics.availability, *(topics.camera_availability(m) for m in cameras)]
    listener = _Listener(site.broker, topics.base)
    logs = [config.parent / "first.log", config.parent / "agent.log"]
    try:
        if offline:  # once, for the persistent session and its subscriptions; then away
            with spawned(_argv(config, options.agent_source), logs[0]) as first:
                _until(lambda: _online(listener, ready, first), "the agent online")
            listener.forget_availability()
            _flood(site.broker, _commands(sent, cameras, topics.base))
        with spawned(_argv(config, options.agent_source), logs[1]) as agent:
            started = time.perf_counter()
            _until(lambda: _online(listener, ready, agent), "the agent online")
            idle = agent.kib("VmRSS")
            if not offline:
                started = time.perf_counter()
                _flood(site.broker, _commands(sent, cameras, topics.base))
            _wait_answers(listener, agent, sent, options.stall)
            peak = agent.kib("VmHWM")
        ours = {f"f{i}" for i in range(sent)}
        answered = [n for rid, n in listener.answers.items() if rid in ours]
        dropped, reconnects, causes = _log_counts(logs)
        return _Case(
            sent=sent,
            answered=len(answered),
            twice=sum(1 for n in answered if n > 1),
            dropped=dropped,
            reconnects=reconnects,
            causes=frozenset(causes),
            agent_peak_kib=peak,
            agent_idle_kib=idle,
            broker_peak_kib=_broker_peak(site.broker),
            seconds=max(0.0, listener.last_answer - started),
        )
    finally:
        listener.close()


def _rows(mode: str, cases: dict[int, _Case]) -> list[Row]:
    (low, first), (high, second) = sorted(cases.items())[0], sorted(cases.items())[-1]
    mib = 1024

    def both(text: str, value: object, other: object) -> Row:
        return Row(f"{mode}: {text}", str(value), str(other))

    return [
        Row(
            f"{mode}: answered (receive_maximum {low} | baseline {high})",
            f"{first.answered:,} of {first.sent:,}",
            f"{second.answered:,} of {second.sent:,}",
            target="all",
            met=first.answered == first.sent and second.answered == second.sent,
        ),
        both("answered twice", first.twice, second.twice),
        both("dropped events (logged)", f"{first.dropped:,}", f"{second.dropped:,}"),
        both("reconnects", first.reconnects, second.reconnects),
        Row(
            f"{mode}: agent peak RSS (RSS once online)",
            f"{first.agent_peak_kib / mib:.0f} MB ({first.agent_idle_kib / mib:.0f})",
            f"{second.agent_peak_kib / mib:.0f} MB ({second.agent_idle_kib / mib:.0f})",
            f"{first.agent_peak_kib / second.agent_peak_kib:.2f}",
        ),
        both(
            "broker peak RSS",
            f"{first.broker_peak_kib / mib:.0f} MB",
            f"{second.broker_peak_kib / mib:.0f} MB",
        ),
        both("duration to the last answer", f"{first.seconds:.1f} s", f"{second.seconds:.1f} s"),
    ]


def measure(options: Options) -> Table:
    rows: list[Row] = []
    causes: set[str] = set()
    for mode, offline in (("online", False), ("offline, then started", True)):
        cases = {}
        for receive_maximum in options.receive_maximum:
            with bench_site("inbound") as site:  # a fresh broker: its peak RSS is this case's
                cases[receive_maximum] = _case(site, options, receive_maximum, offline=offline)
        rows += _rows(mode, cases)
        causes.update(c for case in cases.values() for c in case.causes)
    source = options.agent_source or "this checkout"
    return Table(
        f"inbound: {options.commands:,} commands, {options.cameras} cameras x 4 streams "
        f"(agent from {source})",
        rows,
        notes=[
            "measured = the first receive_maximum, baseline = the last, in the same run",
            "75 % deploys with a 19.9 KB blob inline (26.6 KB JSON), 25 % deletes, QoS 1",
            "answered = request_ids with a terminal event; peak RSS = VmHWM by PID",
            "RSS once online: idle (online), or already reading the flood (offline)",
            f"a case ends at the last answer, or {options.stall:g} s without a new one",
            *(f"reconnected because: {cause}" for cause in sorted(causes)),
        ],
    )


def main() -> int:
    return cli("inbound", measure, Options, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
