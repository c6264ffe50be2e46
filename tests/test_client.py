"""`oak-agent deploy|delete|watch` as a new user runs them: subprocesses against a running agent.

Every broker-facing test runs twice: against the agent's embedded amqtt broker (what
`scripts/demo` starts, and what a new user meets first) and against mosquitto. amqtt sends
a connecting client every retained message that matches *any* client's subscription, so
the observer below (subscribed to `{base}/#`) makes each client command receive the agent's
retained `online`, info and status before its own subscription: the original crash.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import build_parser as cli_parser
from agent.client import decode_event
from agent.messages import Event
from agent.render import size
from agent.topics import Topics
from tests.brokers import Broker, free_port, mosquitto_path
from tests.harness import CAM1, WAIT, Observer, observe
from tests.strategies import hostile_payloads

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import ByteReceiveStream, Process

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SSD = ROOT / "tests" / "data" / "blobs" / "ssd_tiny.blob"
PREFIX = "oakcli"
Kind = Literal["amqtt", "mosquitto"]
OAK = [sys.executable, "-m", "agent.cli"]


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    out: str
    err: str


@dataclass(frozen=True, slots=True)
class Target:
    """A running agent process and how a client reaches it."""

    broker: Broker
    agent_id: str
    config: Path
    topics: Topics

    @property
    def config_args(self) -> list[str]:
        return ["--config", str(self.config)]

    @property
    def flags(self) -> list[str]:
        """The same without the TOML."""
        where = ["--host", self.broker.host, "--port", str(self.broker.port)]
        return [*where, "--prefix", PREFIX, "--agent", self.agent_id]


async def oak(*args: str, timeout: float = WAIT) -> Result:
    """Run `python -m agent.cli ARGS` to its end (killed if it outlives `timeout`)."""
    with anyio.fail_after(timeout):
        done = await anyio.run_process([*OAK, *args], check=False, cwd=ROOT)
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def _agent_toml(path: Path, kind: Kind, host: str, port: int, agent_id: str) -> None:
    broker = "[broker]\nembedded = true\n" if kind == "amqtt" else ""
    path.write_text(
        f"""
[agent]
id = "{agent_id}"
state_dir = "{path.parent / "state"}"

[mqtt]
host = "{host}"
port = {port}
prefix = "{PREFIX}"
reconnect_min = 0.1
reconnect_max = 0.5

{broker}
[[simulator.cameras]]
mxid = "{CAM1}"
name = "front-door"
sensors = {{ CAM_A = "color", CAM_B = "mono", CAM_C = "mono" }}
stereo = [["CAM_B", "CAM_C"]]
boot_seconds = 1.0
fps = 5
"""
    )


async def _listening(port: int) -> None:
    with anyio.fail_after(WAIT):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return


@contextlib.asynccontextmanager
async def running_target(
    kind: Kind, session_broker: Broker, tmp_path: Path
) -> AsyncIterator[tuple[Target, Observer]]:
    """The agent as a subprocess (with its embedded broker for amqtt) and an observer on `{base}/#`."""
    if kind == "mosquitto" and session_broker.kind != "mosquitto":
        pytest.skip("mosquitto is not installed")
    agent_id = f"cli-{uuid.uuid4().hex[:8]}"
    port = free_port() if kind == "amqtt" else session_broker.port
    config = tmp_path / "agent.toml"
    _agent_toml(config, kind, "127.0.0.1", port, agent_id)
    log = (tmp_path / "agent.log").open("wb")
    process = await anyio.open_process(
        [*OAK, "--log-format", "json", "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    try:
        await _listening(port)
        broker = Broker(kind=kind, host="127.0.0.1", port=port, pid=process.pid)
        topics = Topics.for_agent(PREFIX, agent_id)
        async with observe(broker, topics) as observer:
            await observer.wait_for(
                lambda: observer.latest(topics.availability) == b"online", what="agent online"
            )
            await observer.wait_for(lambda: observer.latest(topics.camera_status(CAM1)))
            yield Target(broker, agent_id, config, topics), observer
    finally:
        await _stop(process)
        log.close()


@pytest.fixture(params=["amqtt", "mosquitto"])
def kind(request: pytest.FixtureRequest) -> Kind:
    return request.param  # type: ignore[no-any-return]


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.err, result.err


async def test_deploy_on_a_broker_holding_retained_state(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, _):
        deployed = await oak(
            "deploy", *target.config_args, "--camera", CAM1, "--stream", "CAM_A",
            "--model", str(SSD), "--nn-config", '{"type": "MobileNet"}', "--request-id", "first",
        )  # fmt: skip
        deleted = await oak(
            "delete", *target.flags, "--camera", CAM1, "--stream", "CAM_A", "--request-id", "gone"
        )
    for result, request_id in ((deployed, "first"), (deleted, "gone")):
        _no_traceback(result)
        assert result.code == 0, result
        events = [json.loads(line) for line in result.out.splitlines()]
        assert {e["request_id"] for e in events} == {request_id}
        assert events[0]["state"] == "accepted"
        assert events[-1]["state"] == "succeeded"
    assert [e["state"] for e in map(json.loads, deployed.out.splitlines())] == [
        "accepted", "applying", "succeeded",
    ]  # fmt: skip


async def test_stale_and_malformed_events_are_skipped(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, obs):
        events = target.topics.events
        stale = {"request_id": "late", "action": "deploy", "camera": CAM1, "stream": "CAM_A",
                 "state": "failed", "ts": 1.0}  # fmt: skip
        await obs.send(events, json.dumps(stale).encode(), retain=True)
        with anyio.fail_after(WAIT):
            async with cli_process(
                "deploy", *target.config_args, "--camera", CAM1, "--stream", "CAM_B",
                "--model", str(SSD), "--nn-config", '{"type": "MobileNet"}', "--request-id", "late",
            ) as deploy:  # fmt: skip
                await obs.wait_for(lambda: _seen_state(obs, events, "late", "applying"))
                # while the camera restarts: a payload that is not an event, one of the wrong shape
                await obs.send(events, b"\x00\x01 not an event")
                await obs.send(events, b'{"request_id": "late", "state": 5}')
                await deploy.exited()
        await obs.send(events, b"", retain=True)  # clear the retained message
        before_end = _seen_state(obs, events, "late", "succeeded", garbage_before=True)
    result = deploy.result()
    _no_traceback(result)
    assert result.code == 0, result
    assert before_end, "the malformed events reached the broker after the request ended"
    states = [json.loads(line)["state"] for line in result.out.splitlines()]
    assert states == ["accepted", "applying", "succeeded"]  # not the stale retained `failed`


async def test_rejected_request_exits_1_and_prints_the_event(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, _):
        result = await oak(
            "deploy", *target.flags, "--camera", "FFFFFFFFFFFFFFFFFF", "--stream", "CAM_A",
            "--model", str(SSD), "--request-id", "nope",
        )  # fmt: skip
    _no_traceback(result)
    assert result.code == 1, result
    event = json.loads(result.out.splitlines()[-1])
    assert event["state"] == "rejected"
    assert event["error"]["code"] == "unknown_camera"
    assert "request nope rejected (unknown_camera)" in result.err


async def test_watch_prints_each_message_once_and_summarises_binary(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, _):
        with anyio.fail_after(WAIT):
            async with cli_process("watch", *target.config_args) as watch:
                info = f"{target.topics.info} "
                await watch.wait_for(lambda text: info in text)
                deployed = await oak(
                    "deploy", *target.flags, "--camera", CAM1, "--stream", "CAM_A",
                    "--model", str(SSD), "--nn-config", '{"type": "MobileNet"}',
                    "--request-id", "seen",
                )  # fmt: skip
                assert deployed.code == 0, deployed
                await watch.wait_for(lambda text: '"request_id":"seen","action"' in text
                                     and '"state":"succeeded"' in text)  # fmt: skip
                await watch.wait_for(lambda text: "/nn/detections " in text)
                watch.process.send_signal(signal.SIGINT)
                await watch.exited()
    result = watch.result()
    _no_traceback(result)
    assert result.code == 0, result
    assert result.err == ""
    lines = result.out.splitlines()
    assert all(line.isprintable() for line in lines)
    command = [
        line for line in lines if line.startswith(target.topics.command(CAM1, "CAM_A", "deploy"))
    ]
    assert len(command) == 1
    model = size(SSD.stat().st_size)
    assert re.search(
        r' <msgpack \d+\.\d KB: request_id=seen, nn_config={"type":"MobileNet"}, '
        rf"model={model}, model_name=ssd_tiny.blob>$",
        command[0],
    ), command[0]
    unchanged = _state_topics(target.topics) - {
        target.topics.camera_status(CAM1), target.topics.nn_status(CAM1, "CAM_A")
    }  # fmt: skip
    for topic in unchanged:  # the retained state once, though amqtt sends it twice
        assert sum(line.startswith(f"{topic} ") for line in lines) == 1, topic
    assert f"{target.topics.availability} online" in lines
    status = next(line for line in lines if line.startswith(info))
    assert json.loads(status.removeprefix(info))["agent_id"] == target.agent_id


async def test_watch_on_a_terminal_pretty_prints(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, obs):
        state = _state_topics(target.topics)
        await obs.wait_for(lambda: state <= {m.topic for m in obs.messages}, what="the state")
        master, slave = os.openpty()
        try:
            with anyio.fail_after(WAIT):
                process = await anyio.open_process(
                    [*OAK, "watch", *target.flags, "--count", str(len(state))],
                    stdout=slave, stderr=subprocess.PIPE, cwd=ROOT,
                )  # fmt: skip
                os.close(slave)
                slave = -1
                async with process:
                    out = await anyio.to_thread.run_sync(_read_until_closed, master)
                    await process.wait()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
    assert process.returncode == 0
    text = out.decode().replace("\r\n", "\n")
    assert f'{target.topics.info} {{\n  "agent_id": "{target.agent_id}",\n' in text
    assert f"{target.topics.availability} online\n" in text


async def test_hints_work_when_pasted(kind: Kind, broker: Broker, tmp_path: Path) -> None:
    async with running_target(kind, broker, tmp_path) as (target, obs):
        hints = next(
            line for line in map(_json_or_none, (tmp_path / "agent.log").read_text().splitlines())
            if line and line.get("event") == "try it"
        )  # fmt: skip
        assert f"--config {target.config} --camera {CAM1} --stream CAM_A" in hints["deploy"]
        assert "--model tests/data/blobs/ssd_tiny.blob" in hints["deploy"]
        for name in ("deploy", "delete"):
            with anyio.fail_after(WAIT):
                pasted = await anyio.run_process(["bash", "-c", hints[name]], check=False, cwd=ROOT)
            assert pasted.returncode == 0, (name, pasted)
            assert b'"state":"succeeded"' in pasted.stdout.splitlines()[-1]
        if shutil.which("mosquitto_pub"):
            with anyio.fail_after(WAIT):
                pasted = await anyio.run_process(
                    ["bash", "-c", hints["deploy_with_mosquitto_pub"]], check=False, cwd=ROOT
                )
            assert pasted.returncode == 0, pasted
            outcome = await obs.wait_for(
                lambda: next((e for e in obs.events() if e.request_id.startswith("auto-")
                              and e.terminal), None)
            )  # fmt: skip
            assert outcome.state == "succeeded", outcome


async def test_hints_on_a_terminal_are_plain_lines(tmp_path: Path) -> None:
    agent_id = f"cli-{uuid.uuid4().hex[:8]}"
    port = free_port()
    config = tmp_path / "agent.toml"
    _agent_toml(config, "amqtt", "127.0.0.1", port, agent_id)
    topics = Topics.for_agent(PREFIX, agent_id)
    master, slave = os.openpty()
    try:
        process = await anyio.open_process(
            [*OAK, "run", "--config", str(config)], stdout=slave, stderr=slave, cwd=ROOT
        )
        os.close(slave)
        slave = -1
        try:
            async with anyio.create_task_group() as tg:
                seen: list[bytes] = []

                async def _read() -> None:
                    seen.append(await anyio.to_thread.run_sync(_read_until_closed, master))

                tg.start_soon(_read)
                await _listening(port)
                broker = Broker(kind="amqtt", host="127.0.0.1", port=port, pid=process.pid)
                async with observe(broker, topics) as obs:
                    await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
                await _stop(process)
        finally:
            await _stop(process)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = seen[0].decode().replace("\r\n", "\n")
    assert "Try it, in another terminal in this folder:" in text
    assert (
        f"\n  {sys.executable} -m agent.cli deploy --config {config} --camera {CAM1} --stream CAM_A"
        ' --model tests/data/blobs/ssd_tiny.blob --nn-config \'{"type": "MobileNet"}\'\n'
    ) in text
    assert "try it" not in text  # no log line repeating the commands, escaped


async def test_no_answer_in_time(kind: Kind, broker: Broker, tmp_path: Path) -> None:
    async with running_target(kind, broker, tmp_path) as (target, _):
        where = ["--host", "127.0.0.1", "--port", str(target.broker.port), "--prefix", PREFIX]
        nobody = ["--agent", "nobody-here"]
        deploy = await oak(
            "delete", *where, *nobody, "--camera", CAM1, "--stream", "CAM_A", "--timeout", "0.5"
        )
        watch = await oak("watch", *where, *nobody, "--count", "1", "--timeout", "0.5")
    _no_traceback(deploy)
    assert deploy.code == 3, deploy
    assert deploy.err.splitlines() == [
        f"oak-agent delete: no answer from agent 'nobody-here' on 127.0.0.1:{target.broker.port}"
        " within 0.5 s (is it running? `oak-agent watch` shows what it publishes)"
    ]
    _no_traceback(watch)
    assert watch.code == 3, watch
    assert watch.err.splitlines() == ["oak-agent watch: 0 of 1 messages within 0.5 s"]


@pytest.mark.parametrize("command", ["deploy", "delete", "watch"])
async def test_unreachable_broker_is_one_line(command: str) -> None:
    port = free_port()  # nothing listens there
    args = ["--agent", "demo", "--port", str(port)]
    if command != "watch":
        args += ["--camera", CAM1, "--stream", "CAM_A"]
    if command == "deploy":
        args += ["--model", str(SSD)]
    result = await oak(command, *args)
    assert result.code == 4, result
    assert result.out == ""
    assert result.err.splitlines() == [
        f"oak-agent {command}: cannot connect to the MQTT broker at 127.0.0.1:{port}: "
        "[Errno 111] Connection refused"
    ]


async def test_refused_login_is_one_line(tmp_path: Path) -> None:
    binary = mosquitto_path()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\nlog_dest none\n")
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    process = await anyio.open_process([binary, "-c", str(conf)])
    try:
        await _listening(port)
        result = await oak(
            "watch", "--agent", "demo", "--port", str(port), "--username", "someone",
            "--password-file", str(secret),
        )  # fmt: skip
    finally:
        with anyio.move_on_after(10, shield=True):
            process.terminate()
            await process.wait()
    assert result.code == 4, result
    assert result.err.splitlines() == [
        f"oak-agent watch: the broker at 127.0.0.1:{port} refused the credentials "
        f"(username 'someone', the password from {secret}): [code:135] Not authorized"
    ]
    assert "wrong" not in result.err  # the password itself is never shown


async def test_version_help_and_usage_errors() -> None:
    version = await oak("--version")
    assert version.code == 0
    assert version.out == f"oak-agent {importlib.metadata.version('oak-edge-agent')}\n"
    top = await oak("--help")
    assert top.code == 0
    assert "Deploy neural networks onto Luxonis OAK cameras over MQTT" in top.out
    assert "argv ->" not in top.out
    helped = await oak("deploy", "--help")
    assert helped.code == 0, helped
    assert "exit codes:" in helped.out
    assert "--agent AGENT" in helped.out
    missing = await oak("delete", "--camera", CAM1, "--stream", "CAM_A")
    assert missing.code == 2
    assert missing.err.splitlines()[-1] == (
        "oak-agent delete: error: --agent is required without --config"
    )
    bad = await oak("deploy", "--agent", "a", "--camera", CAM1, "--stream", "CAM_A",
                    "--model", str(SSD), "--nn-config", "{nope")  # fmt: skip
    assert bad.code == 2
    assert "argument --nn-config: not JSON" in bad.err
    _no_traceback(bad)


@given(st.binary(max_size=500) | hostile_payloads)
def test_anything_on_the_events_topic_decodes_or_is_skipped(payload: bytes) -> None:
    event = decode_event(payload)
    assert event is None or isinstance(event, Event)


@given(st.sampled_from(["accepted", "failed"]), st.text(max_size=20))
def test_a_real_event_decodes(state: str, request_id: str) -> None:
    payload = json.dumps({"request_id": request_id, "action": "deploy", "camera": CAM1,
                          "stream": "CAM_A", "state": state, "ts": 1.5}).encode()  # fmt: skip
    assert decode_event(payload) == Event(request_id, "deploy", CAM1, "CAM_A", state, 1.5)  # type: ignore[arg-type]


def test_every_option_has_help() -> None:
    parser = cli_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {
        "run",
        "deploy",
        "delete",
        "watch",
        "status",
        "upload",
        "models",
        "keygen",
        "audit",
        "fleet",
    }
    fleet = subparsers.choices["fleet"]
    actions = next(a for a in fleet._actions if isinstance(a, argparse._SubParsersAction))
    assert set(actions.choices) == {"deploy", "delete", "status", "abort"}
    parsers = [
        ("oak-agent", parser),
        *subparsers.choices.items(),
        *((f"fleet {name}", sub) for name, sub in actions.choices.items()),
    ]
    with_exit_codes = ("deploy", "delete", "watch", "status", "upload", "models", "audit", "fleet")
    for name, sub in parsers:
        if name in with_exit_codes or name.startswith("fleet "):
            assert "exit codes:" in sub.format_help()
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


# --- helpers ------------------------------------------------------------------------------


def _seen_state(
    obs: Observer, topic: str, request_id: str, state: str, *, garbage_before: bool = False
) -> bool:
    """Whether `state` of `request_id` was published (and, optionally, after our garbage)."""
    garbage = False
    for message in obs.on(topic):
        if message.payload.startswith((b"\x00", b'{"request_id": "late", "state": 5')):
            garbage = True
        event = _json_or_none(message.payload.decode(errors="replace"))
        if event and event.get("request_id") == request_id and event.get("state") == state:
            return garbage or not garbage_before
    return False


def _state_topics(topics: Topics) -> set[str]:
    """The retained topics of the agent in `running_target`, with one camera."""
    streams = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")
    return {
        topics.availability,
        topics.info,
        topics.camera_availability(CAM1),
        topics.camera_status(CAM1),
        *(topics.nn_status(CAM1, stream) for stream in streams),
        topics.stats,
        topics.camera_stats(CAM1),
    }


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_until_closed(fd: int) -> bytes:
    """Read a pty master until every writer closed it (Linux: EIO)."""
    chunks = []
    for _ in range(10_000):
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Live:
    """A client command running in the background, its output collected as it comes."""

    process: Process
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _drained: int = 0

    async def _pump(self, stream: ByteReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into.extend(chunk)
            self._changed.set()
            self._changed = anyio.Event()
        self._drained += 1
        self._changed.set()

    async def wait_for(self, found: Callable[[str], bool]) -> None:
        while True:
            changed = self._changed
            if found(self.out.decode(errors="replace")):
                return
            if self.process.returncode is not None and self._drained == 2:
                raise AssertionError(f"exited before the output matched: {self.result()}")
            await changed.wait()

    async def exited(self) -> None:
        await self.process.wait()
        while self._drained < 2:
            changed = self._changed
            await changed.wait()

    def result(self) -> Result:
        code = -1 if self.process.returncode is None else self.process.returncode
        return Result(code, self.out.decode(errors="replace"), self.err.decode(errors="replace"))


@contextlib.asynccontextmanager
async def cli_process(*args: str) -> AsyncIterator[Live]:
    """`python -m agent.cli ARGS` in the background; stopped by its PID on exit."""
    process = await anyio.open_process([*OAK, *args], cwd=ROOT)
    live = Live(process)
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None
            assert process.stderr is not None
            tg.start_soon(live._pump, process.stdout, live.out)
            tg.start_soon(live._pump, process.stderr, live.err)
            yield live
            await _stop(process)
    finally:
        await _stop(process)


async def _stop(process: Process) -> None:
    with anyio.move_on_after(10, shield=True):
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(8):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
