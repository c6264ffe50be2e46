"""`oak-agent fleet` as a user runs it (subprocess), against agent processes on mosquitto."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from agent.fleet.config import load_controller_config
from agent.fleet.plan import decode_rollout
from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import run_broker
from tests.harness import CAM1, CAM2, YOLO, observe, yolo
from tests.test_previous_models import _pruned_past_the_grace

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from agent.fleet.plan import Rollout
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

PREFIX = "oaktest"
MOBILENET = '{"type": "MobileNet"}'


def controller_config(path: Path, broker: Broker) -> Path:
    path.write_text(
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "{PREFIX}"\n'
        f'protocol = "{broker.protocol}"\n'
    )
    return path


def fleet_command(config: Path, *args: str) -> list[str]:
    action, *rest = args
    return [sys.executable, "-m", "agent.cli", "fleet", action, "--config", str(config), *rest]


async def run_fleet(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(120):
        return await anyio.run_process(fleet_command(config, *args), check=False)


def _online(obs: Observer) -> bool:
    return obs.latest(obs.topics.availability) == b"online"


@contextlib.asynccontextmanager
async def fleet_of(
    broker: Broker,
    tmp_path: Path,
    group: str,
    count: int,
    boot_seconds: float = 0.3,
    extra: str = "",
) -> AsyncIterator[dict[str, Observer]]:
    """`count` agent processes in `group`, two cameras each, each watched by an observer;
    `extra`: config sections they all have."""
    tag = uuid.uuid4().hex[:6]
    async with contextlib.AsyncExitStack() as stack:
        observers = {}
        for n in range(count):
            agent_id = f"f{n}-{tag}"
            obs = await stack.enter_async_context(
                observe(broker, Topics.for_agent(PREFIX, agent_id))
            )
            observers[agent_id] = obs
            config = write_config(
                tmp_path / f"{agent_id}.toml",
                broker,
                tmp_path / agent_id,
                agent_id,
                groups=(group,),
                cameras=((CAM1, f"door{n}"), (CAM2, f"yard{n}")),
                boot_seconds=boot_seconds,
                extra=extra,
            )
            stack.enter_context(agent_process(config, tmp_path / f"{agent_id}.log"))
        for agent_id, obs in observers.items():
            await obs.wait_for(partial(_online, obs), what=f"{agent_id} online")
        yield observers


def _record(obs: Observer, rollout_id: str) -> Rollout | None:
    payload = obs.latest(f"{PREFIX}/rollouts/{rollout_id}")
    return decode_rollout(payload) if payload else None


def deploy_args(
    group: str, blob: Path, rollout_id: str, *more: str, nn_config: str = MOBILENET
) -> list[str]:
    """`fleet deploy` arguments: `blob` onto CAM_A of every camera in `group`, then `more`."""
    return [
        "deploy",
        "--group",
        group,
        "--stream",
        "CAM_A",
        "--model",
        str(blob),
        "--nn-config",
        nn_config,
        "--rollout-id",
        rollout_id,
        *more,
    ]


async def _deploy_everywhere(
    config: Path, group: str, blob: Path, rollout_id: str
) -> subprocess.CompletedProcess[bytes]:
    return await run_fleet(config, *deploy_args(group, blob, rollout_id, "--timeout", "30"))


def _sha(obs: Observer, camera: str) -> str | None:
    status = obs.latest_json(obs.topics.nn_status(camera, "CAM_A"))
    if status is None or status["model"] is None:
        return None
    sha: str = status["model"]["sha256"]
    return sha


async def test_rollout_in_waves_then_status_from_another_process(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    rollout_id = f"w-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    report = tmp_path / "report.json"
    async with fleet_of(broker, tmp_path, group, 2) as agents:
        waves = ("--max-parallel", "3", "--batch-percent", "50", "--report", str(report))
        done = await run_fleet(
            config, *deploy_args(group, own_blobs["ssd_tiny"], rollout_id, *waves)
        )
        assert done.returncode == 0, done.stderr.decode()
        lines = done.stdout.decode().splitlines()
        assert lines[-1].startswith(f"rollout {rollout_id}: succeeded; 4 cameras: 4 succeeded")
        document = json.loads(report.read_text())
        assert document["counts"] == {"succeeded": 4}
        assert document["exit_code"] == 0
        # 50 % of 4 cameras: two waves of two
        assert sorted(t["wave"] for t in document["rollout"]["targets"]) == [1, 1, 2, 2]
        sha = hashlib.sha256(own_blobs["ssd_tiny"].read_bytes()).hexdigest()
        for obs in agents.values():
            for camera in (CAM1, CAM2):
                assert _sha(obs, camera) == sha
                # one request per camera under the rollout's id, run once
                states = [e.state for e in obs.events(rollout_id) if e.camera == camera]
                assert states == ["accepted", "applying", "succeeded"]
        # the record is retained: another process reads it
        status = await run_fleet(config, "status", rollout_id, "--json")
        assert status.returncode == 0, status.stderr.decode()
        record = json.loads(status.stdout)
        assert record["state"] == "succeeded"
        assert {t["agent"] for t in record["targets"]} == set(agents)
        missing = await run_fleet(config, "status", "no-such-rollout")
        assert missing.returncode == 2
        assert b"no rollout no-such-rollout" in missing.stderr
        # the same id again is refused: it exists
        again = await _deploy_everywhere(config, group, own_blobs["ssd_tiny"], rollout_id)
        assert again.returncode == 2
        assert b"--resume it" in again.stderr


async def test_forced_failure_aborts_and_rolls_back(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    ssd_sha = hashlib.sha256(own_blobs["ssd_tiny"].read_bytes()).hexdigest()
    async with fleet_of(broker, tmp_path, group, 2) as agents:
        first, second = agents.values()
        # before: CAM1 everywhere runs the SSD; CAM2 runs nothing
        before_id = f"before-{uuid.uuid4().hex[:8]}"
        only_cam1 = deploy_args(group, own_blobs["ssd_tiny"], before_id, "--camera", CAM1)
        before = await run_fleet(config, *only_cam1)
        assert before.returncode == 0, before.stderr.decode()
        # the second agent's CAM1 fails its next boot: wave 2 has a failure
        await second.send(second.topics.simulator(CAM1, "fail_next_boot"), b"")
        rollout_id = f"ab-{uuid.uuid4().hex[:8]}"
        report = tmp_path / "report.json"
        yolo = {
            "type": "YOLO",
            "nn_config": {
                "num_classes": 80,
                "anchors": [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319],
                "anchor_masks": {"side26": [0, 1, 2], "side13": [3, 4, 5]},
            },
        }
        abort = ("--max-parallel", "2", "--abort-percent", "20", "--min-executed", "2")
        done = await run_fleet(
            config,
            *deploy_args(
                group,
                own_blobs["yolo_tiny"],
                rollout_id,
                *abort,
                "--report",
                str(report),
                nn_config=json.dumps(yolo),
            ),
        )
        assert done.returncode == 1, done.stderr.decode()
        document = json.loads(report.read_text())
        rollout = document["rollout"]
        assert rollout["state"] == "aborted"
        assert "more than 20 %" in rollout["reason"]
        states = {(t["agent"], t["camera"]): t["state"] for t in rollout["targets"]}
        failed = (second.topics.base.rpartition("/")[2], CAM1)
        assert states.pop(failed) == "failed"
        assert set(states.values()) == {"rolled_back"}
        assert document["counts"] == {"failed": 1, "rolled_back": 3}
        # every camera runs what it ran before: the SSD on CAM1 (by sha256, from the agents'
        # stores), nothing on CAM2 (deleted); the failed one rolled itself back
        for obs in (first, second):
            assert _sha(obs, CAM1) == ssd_sha
            assert obs.latest_json(obs.topics.nn_status(CAM2, "CAM_A"))["state"] == "none"
        assert [e.state for e in first.events(f"{rollout_id}.rollback") if e.camera == CAM2][
            -1
        ] == "succeeded"
        assert "abort" in done.stdout.decode()


async def _until_succeeded(obs: Observer, rollout_id: str, count: int) -> Rollout:
    def found() -> Rollout | None:
        record = _record(obs, rollout_id)
        done = record is not None and sum(t.state == "succeeded" for t in record.targets)
        return record if done and done >= count else None

    return await obs.wait_for(found, timeout=60, what=f"{count} cameras succeeded")


def _one_at_a_time(config: Path, group: str, blob: Path, rollout_id: str) -> list[str]:
    """`fleet deploy` of `blob` onto CAM_A of `group`, one camera per wave."""
    return fleet_command(config, *deploy_args(group, blob, rollout_id, "--max-parallel", "1"))


async def _killed_after_one_succeeded(
    config: Path, group: str, blob: Path, rollout_id: str, records: Observer
) -> None:
    """Start that rollout and SIGKILL its controller once one camera has succeeded."""
    process = await anyio.open_process(_one_at_a_time(config, group, blob, rollout_id))
    try:
        await _until_succeeded(records, rollout_id, 1)
    finally:
        process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()


async def test_resume_after_the_controller_is_killed(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    rollout_id = f"rs-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    blob = own_blobs["ssd_tiny"]
    async with (
        fleet_of(broker, tmp_path, group, 2, boot_seconds=1.0) as agents,
        observe(broker, Topics(f"{PREFIX}/rollouts/{rollout_id}")) as records,
    ):
        await _killed_after_one_succeeded(config, group, blob, rollout_id, records)
        # its will tells that nobody runs the rollout any more
        controller = f"{PREFIX}/rollouts/{rollout_id}/controller"
        await records.wait_for(lambda: records.latest(controller) == b"offline", what="will")
        killed = _record(records, rollout_id)
        assert killed is not None
        assert killed.state == "running"
        assert {t.state for t in killed.targets} & {"pending", "sent"}
        resumed = await run_fleet(config, "deploy", "--resume", rollout_id, "--model", str(blob))
        assert resumed.returncode == 0, resumed.stderr.decode()
        final = _record(records, rollout_id)
        assert final is not None
        assert final.state == "succeeded"
        assert [t.state for t in final.targets] == ["succeeded"] * 4
        for obs in agents.values():
            for camera in (CAM1, CAM2):
                states = [e.state for e in obs.events(rollout_id) if e.camera == camera]
                assert states[-1] == "succeeded"
                # each camera ran it once: a command sent again is answered from the record
                assert obs.latest_json(obs.topics.camera_status(camera))["restarts"] == 1
        # a finished rollout resumed again just says so
        again = await run_fleet(config, "deploy", "--resume", rollout_id)
        assert again.returncode == 0
        assert b"succeeded" in again.stdout


async def test_fleet_abort_from_another_process_when_no_controller_runs(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    rollout_id = f"fa-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    async with (
        fleet_of(broker, tmp_path, group, 1, boot_seconds=1.0) as agents,
        observe(broker, Topics(f"{PREFIX}/rollouts/{rollout_id}")) as records,
    ):
        (obs,) = agents.values()
        await _killed_after_one_succeeded(config, group, own_blobs["ssd_tiny"], rollout_id, records)
        controller = f"{PREFIX}/rollouts/{rollout_id}/controller"
        await records.wait_for(lambda: records.latest(controller) == b"offline", what="will")
        aborted = await run_fleet(config, "abort", rollout_id, "--timeout", "30")
        assert aborted.returncode == 1, aborted.stderr.decode()
        final = _record(records, rollout_id)
        assert final is not None
        assert final.state == "aborted"
        # what had run (or may have) is back to nothing; what was never sent stays pending
        states = sorted(t.state for t in final.targets)
        assert "rolled_back" in states
        assert set(states) <= {"rolled_back", "pending"}
        for target in final.targets:
            if target.state == "rolled_back":
                status = obs.latest_json(obs.topics.nn_status(target.camera, "CAM_A"))
                assert status["state"] == "none"


def test_example_controller_config_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "controller.example.toml"
    config = load_controller_config(example)
    assert config.mqtt.prefix == "oak"
    assert config.mqtt.port == 8883


def test_fleet_help_and_bad_arguments(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('[mqtt]\nport = 1\nprefix = "oaktest"\n')
    shown = subprocess.run(
        [sys.executable, "-m", "agent.cli", "fleet", "deploy", "--help"],
        check=False,
        capture_output=True,
    )
    assert shown.returncode == 0
    assert b"--abort-percent" in shown.stdout
    bad = subprocess.run(
        fleet_command(config, "deploy", "--stream", "CAM_Q"), check=False, capture_output=True
    )
    assert bad.returncode == 2
    assert b"CAM_Q" in bad.stderr
    no_model = subprocess.run(
        fleet_command(config, "deploy", "--stream", "CAM_A"), check=False, capture_output=True
    )
    assert no_model.returncode == 2
    assert b"--model, --model-url or --model-sha256 is required" in no_model.stderr
    sha = "ab" * 32
    for wrong, said in (
        (["--model", str(config), "--model-sha256", sha], b"--model goes alone"),
        (["--model-url", "http://127.0.0.1:1/m.blob"], b"--model-url needs --model-sha256"),
        (["--model-sha256", sha, "--model-size", "10"], b"--model-size goes with --model-url"),
        (["--model-sha256", "xyz"], b"'xyz' is not a sha256"),
        (["--model", str(tmp_path / "missing.blob")], b"cannot read"),
        (["--model-sha256", sha, "--max-packet", "100"], b"--max-packet"),
    ):
        refused = subprocess.run(
            fleet_command(config, "deploy", "--stream", "CAM_A", *wrong),
            check=False,
            capture_output=True,
        )
        assert refused.returncode == 2, (wrong, refused.stderr)
        assert said in refused.stderr, (wrong, refused.stderr)
    typo = tmp_path / "typo.toml"
    typo.write_text("[mqtt]\nhots = 'x'\n")
    unknown = subprocess.run(fleet_command(typo, "status", "r1"), check=False, capture_output=True)
    assert unknown.returncode == 2
    assert b"hots" in unknown.stderr


async def test_fleet_abort_asks_the_running_controller(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    rollout_id = f"fl-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    async with (
        fleet_of(broker, tmp_path, group, 2, boot_seconds=1.0) as agents,
        observe(broker, Topics(f"{PREFIX}/rollouts/{rollout_id}")) as records,
    ):
        command = _one_at_a_time(config, group, own_blobs["ssd_tiny"], rollout_id)
        async with await anyio.open_process(command) as process:
            await _until_succeeded(records, rollout_id, 1)
            aborted = await run_fleet(config, "abort", rollout_id, "--timeout", "30")
            with anyio.fail_after(60):
                assert await process.wait() == 1
        assert aborted.returncode == 1, aborted.stderr.decode()
        assert b"aborted" in aborted.stdout
        final = _record(records, rollout_id)
        assert final is not None
        assert final.state == "aborted"
        assert final.reason == "abort requested"
        states = [t.state for t in final.targets]
        assert "rolled_back" in states
        assert set(states) <= {"rolled_back", "pending"}
        for target in final.targets:
            if target.state == "rolled_back":
                obs = agents[target.agent]
                assert (
                    obs.latest_json(obs.topics.nn_status(target.camera, "CAM_A"))["state"] == "none"
                )


async def test_signed_rollout_to_agents_that_require_signatures(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    keys = tmp_path / "keys"
    made = await anyio.run_process(
        [sys.executable, "-m", "agent.cli", "keygen", "--out", str(keys), "--key-id", "fleet"],
        check=False,
    )
    assert made.returncode == 0, made.stderr
    public = (keys / "fleet.pub").read_text().strip()
    security = (
        f'[security]\nrequire_signed = true\n\n[[security.keys]]\nid = "fleet"\n'
        f'public_key = "{public}"\n'
    )
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    tag = uuid.uuid4().hex[:6]
    agent_id = f"signed-{tag}"
    async with observe(broker, Topics.for_agent(PREFIX, agent_id)) as obs:
        agent_config = write_config(
            tmp_path / "agent.toml",
            broker,
            tmp_path / "state",
            agent_id,
            groups=(group,),
            extra=security,
        )
        with agent_process(agent_config, tmp_path / "agent.log"):
            await obs.wait_for(partial(_online, obs), what="online")
            base = ["deploy", "--group", group, "--stream", "CAM_A", "--model"]
            model = [str(own_blobs["ssd_tiny"]), "--nn-config", MOBILENET]
            unsigned = await run_fleet(config, *base, *model, "--rollout-id", f"u-{tag}")
            assert unsigned.returncode == 1  # refused (unauthorized): aborted
            assert b"unauthorized" in unsigned.stdout
            key = ["--sign-key", str(keys / "fleet.key")]
            done = await run_fleet(config, *base, *model, *key, "--rollout-id", f"s-{tag}")
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
            for camera in (CAM1, CAM2):
                assert (
                    _sha(obs, camera)
                    == hashlib.sha256(own_blobs["ssd_tiny"].read_bytes()).hexdigest()
                )


async def test_rollout_on_the_embedded_broker(tmp_path: Path, own_blobs: dict[str, Path]) -> None:
    """amqtt (the demo's embedded broker, MQTT 3.1.1): discovery, waves, the record."""
    with run_broker("amqtt", tmp_path / "amqtt") as amqtt:
        group = f"fleet-{uuid.uuid4().hex[:8]}"
        rollout_id = f"am-{uuid.uuid4().hex[:8]}"
        config = controller_config(tmp_path / "controller.toml", amqtt)
        async with fleet_of(amqtt, tmp_path, group, 2) as agents:
            done = await _deploy_everywhere(config, group, own_blobs["ssd_tiny"], rollout_id)
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
            for obs in agents.values():
                for camera in (CAM1, CAM2):
                    status = obs.latest_json(obs.topics.nn_status(camera, "CAM_A"))
                    assert status["request_id"] == rollout_id
            status = await run_fleet(config, "status", rollout_id, "--json")
            assert json.loads(status.stdout)["state"] == "succeeded"


async def test_an_abort_long_after_the_models_were_replaced_still_rolls_back(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """The agent keeps each stream's model before its current one past
    `models.keep_unreferenced` (2 s here): the rollback by sha256 finds it."""
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    rollout_id = f"fl-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    # a model of its own on each camera: nothing but the rollback keeps it
    before = {
        CAM1: (own_blobs["yolo_tiny"].read_bytes(), YOLO),
        CAM2: (own_blobs["yolo_tiny_c2"].read_bytes(), yolo(num_classes=2)),
    }
    keep = "[models]\nkeep_unreferenced = 2\n"
    async with (
        fleet_of(broker, tmp_path, group, 1, boot_seconds=0.5, extra=keep) as agents,
        observe(broker, Topics(f"{PREFIX}/rollouts/{rollout_id}")) as records,
    ):
        ((agent_id, obs),) = agents.items()
        for camera, (blob, nn_config) in before.items():
            body = {"request_id": f"before-{camera}", "nn_config": nn_config, "model": blob}
            await obs.deploy(camera, "CAM_A", body, encoding="msgpack")
            assert (await obs.outcome(f"before-{camera}")).state == "succeeded"
        await _killed_after_one_succeeded(config, group, own_blobs["ssd_tiny"], rollout_id, records)
        controller = f"{PREFIX}/rollouts/{rollout_id}/controller"
        await records.wait_for(lambda: records.latest(controller) == b"offline", what="will")
        await _pruned_past_the_grace(obs, tmp_path / agent_id / "models", before[CAM1][0], "probe")
        aborted = await run_fleet(config, "abort", rollout_id, "--timeout", "30")
        assert aborted.returncode == 1, aborted.stderr.decode()
        final = _record(records, rollout_id)
        assert final is not None
        assert final.state == "aborted"
        states = sorted(t.state for t in final.targets)
        assert "rolled_back" in states
        assert set(states) <= {"rolled_back", "pending"}, final.targets
        for target in final.targets:
            if target.state == "rolled_back":
                blob = before[target.camera][0]
                assert _sha(obs, target.camera) == hashlib.sha256(blob).hexdigest()


async def test_the_live_table_on_a_terminal(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """On a terminal (a pty, 120 columns) the rollout is a rich table redrawn in place, then its summary;
    `fleet status` on a terminal draws the same table."""
    group = f"fleet-{uuid.uuid4().hex[:8]}"
    rollout_id = f"tty-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    async with fleet_of(broker, tmp_path, group, 1):
        deploy = _one_at_a_time(config, group, own_blobs["ssd_tiny"], rollout_id)
        shown = await _on_a_terminal(deploy)
        status = await _on_a_terminal(fleet_command(config, "status", rollout_id))
    assert shown.code == 0, shown.text
    # redrawn in place: the cursor goes back up over the table for each change
    assert shown.text.count("\x1b[1A") > 2 * len(("door", "yard"))
    plain = _without_escapes(shown.text)
    for header in ("wave", "agent", "camera", "name", "state", "error"):
        assert header in plain
    assert "┃" in plain or "│" in plain  # a drawn table, not plain lines
    assert "door0" in plain
    assert "yard0" in plain
    assert plain.rstrip().splitlines()[-1].startswith(f"rollout {rollout_id}: succeeded")
    assert status.code == 0, status.text
    table = _without_escapes(status.text)
    assert f"rollout {rollout_id}: succeeded; 2 cameras: 2 succeeded" in table
    assert table.count("succeeded") >= 3  # the title and both rows
    assert "controller: not running" in table


@dataclass(frozen=True)
class _Terminal:
    code: int
    text: str


async def _on_a_terminal(command: list[str]) -> _Terminal:
    """Run `command` with a pty as its stdout and stderr; what it wrote."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    try:
        process = await anyio.open_process(command, stdout=follower, stderr=follower, env=env)
        os.close(follower)
        follower = -1
        async with process:
            with anyio.fail_after(120):
                text = await anyio.to_thread.run_sync(_read_until_closed, leader)
                code = await process.wait()
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return _Terminal(code, text.decode(errors="replace").replace("\r\n", "\n"))


def _read_until_closed(fd: int) -> bytes:
    """Read a pty leader until every writer closed it (Linux: EIO)."""
    chunks = []
    for _ in range(100_000):
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _without_escapes(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
