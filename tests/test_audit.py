"""The audit log, through the real agent over MQTT: one line per command received, one per
request that ends; rotation; an unwritable folder; `oak-agent audit`; private files."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pty
import re
import signal
import stat
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from agent.audit import audit_files
from agent.config import SecuritySection
from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.harness import (
    CAM1,
    CAM2,
    YOLO,
    Observer,
    agent_and_observer,
    camera_spec,
    make_config,
    observe,
    running_agent,
)
from tests.test_signed_commands import (
    STRANGER,
    deploy_body,
    publish,
    security,
    signed,
)

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config import Config
    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

FIELDS = {
    "ts",
    "kind",
    "topic",
    "action",
    "camera",
    "stream",
    "request_id",
    "key_id",
    "signed",
    "payload_sha256",
    "payload_bytes",
    "model_sha256",
    "state",
    "error",
    "superseded_by",
    "replayed_state",
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _lines(audit: Path) -> list[dict[str, Any]]:
    """Every line of the audit files, oldest first."""
    lines = []
    for path in audit_files(audit):
        if path.exists():
            lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def _of(lines: list[dict[str, Any]], request_id: str) -> list[tuple[str, str]]:
    return [(line["kind"], line["state"]) for line in lines if line["request_id"] == request_id]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _with_audit(config: Config, **options: Any) -> Config:
    return msgspec.structs.replace(config, security=SecuritySection(**options))


async def test_one_line_per_command_and_one_per_outcome(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["ssd_tiny"].read_bytes()
    state = tmp_path / "state"
    cameras = (camera_spec(CAM1, boot_seconds=1.0), camera_spec(CAM2))
    config = make_config(broker, state, cameras=cameras)

    def mobilenet(request_id: str, threshold: float) -> dict[str, Any]:
        nn = {"type": "MobileNet", "nn_config": {"confidence_threshold": threshold}}
        return {"request_id": request_id, "nn_config": nn, "model_sha256": _sha(blob)}

    ok: dict[str, Any] = {"request_id": "ok", "nn_config": {"type": "MobileNet"}, "model": blob}
    big_model = blob + os.urandom(1536 * 1024)
    big = {**ok, "request_id": "big", "model": big_model}
    sent = 0
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", ok)
        assert (await obs.outcome("ok")).state == "succeeded"
        await obs.deploy(CAM1, "CAM_A", {"request_id": "bad", "nn_config": {"type": "Nope"}})
        assert (await obs.outcome("bad")).state == "rejected"
        await obs.deploy(CAM1, "CAM_A", ok)  # the same request_id again: replayed
        await obs.wait_for(lambda: len([e for e in obs.events("ok") if e.terminal]) == 2)
        # s2 waits behind s1's apply and is replaced by s3 before its turn
        await obs.deploy(CAM1, "CAM_A", mobilenet("s1", 0.6))
        await obs.wait_for(lambda: "applying" in obs.states("s1"))
        await obs.deploy(CAM1, "CAM_A", mobilenet("s2", 0.7))
        await obs.deploy(CAM1, "CAM_A", mobilenet("s3", 0.8))
        assert (await obs.outcome("s2")).state == "superseded"
        assert (await obs.outcome("s3")).state == "succeeded"
        await obs.delete(CAM2, "CAM_B", {"request_id": "del"})
        assert (await obs.outcome("del")).state == "succeeded"
        # above 1 MiB the payload is hashed in a thread, beside the model's own hashing
        await obs.deploy(CAM2, "CAM_A", big, encoding="msgpack")
        assert (await obs.outcome("big")).state == "succeeded"
        await obs.delete("NOPE", "CAM_A", {"request_id": "nope"})
        assert (await obs.outcome("nope")).error.code == "unknown_camera"  # type: ignore[union-attr]
        unplugged = obs.topics.camera_availability(CAM2)
        await obs.send(obs.topics.simulator(CAM2, "unplug"), b"")
        await obs.wait_for(lambda: obs.latest(unplugged) == b"offline")
        await obs.delete(CAM2, "CAM_B", {"request_id": "off"})  # refused by the coordinator
        assert (await obs.outcome("off")).error.code == "camera_offline"  # type: ignore[union-attr]
        await obs.send(obs.topics.simulator(CAM2, "replug"), b"")
        await obs.wait_for(lambda: obs.latest(unplugged) == b"online")
        sent = 12
    audit = state / "audit"
    lines = _lines(audit)
    assert all(set(line) == FIELDS for line in lines), lines[0]
    assert len([line for line in lines if line["kind"] == "received"]) == sent
    _check_first(lines, obs.topics, msgspec.json.encode(ok), blob)
    _check_large(lines, msgspec.msgpack.encode(big), big_model)
    _check_the_others(lines)
    text = (audit / "audit.jsonl").read_bytes()
    assert base64.b64encode(blob) not in text  # never the model
    assert blob[:64] not in text
    assert (_mode(audit), _mode(audit / "audit.jsonl")) == (0o700, 0o600)
    print(f"audit: {sent} commands -> {len(lines)} lines ({len(text)} bytes)")


def _check_large(lines: list[dict[str, Any]], payload: bytes, model: bytes) -> None:
    large = next(x for x in lines if x["request_id"] == "big" and x["kind"] == "received")
    assert (large["payload_sha256"], large["payload_bytes"]) == (_sha(payload), len(payload))
    assert large["model_sha256"] == _sha(model)


def _check_first(lines: list[dict[str, Any]], topics: Topics, payload: bytes, blob: bytes) -> None:
    """A deploy that succeeded, then its request_id sent again."""
    first = [line for line in lines if line["request_id"] == "ok"]
    assert [(x["kind"], x["state"]) for x in first] == [
        ("received", "submitted"),
        ("outcome", "succeeded"),
        ("received", "replayed"),
    ]
    received = first[0]
    assert received["topic"] == topics.command(CAM1, "CAM_A", "deploy")
    assert (received["action"], received["camera"], received["stream"]) == ("deploy", CAM1, "CAM_A")
    assert received["payload_sha256"] == _sha(payload)
    assert received["payload_bytes"] == len(payload)
    assert received["model_sha256"] == first[1]["model_sha256"] == _sha(blob)
    assert (received["signed"], received["key_id"]) == (False, None)
    assert (first[1]["signed"], first[1]["key_id"]) == (False, None)
    assert first[2]["replayed_state"] == "succeeded"


def _check_the_others(lines: list[dict[str, Any]]) -> None:
    assert _of(lines, "bad") == [("received", "rejected")]  # a rejection is one line
    bad = next(line for line in lines if line["request_id"] == "bad")
    assert bad["error"]["code"] == "invalid_payload"
    assert _of(lines, "nope") == [("received", "rejected")]
    assert _of(lines, "off") == [("received", "rejected")]
    assert _of(lines, "s2") == [("received", "submitted"), ("outcome", "superseded")]
    assert (
        next(x for x in lines if x["request_id"] == "s2" and x["kind"] == "outcome")[
            "superseded_by"
        ]
        == "s3"
    )
    assert _of(lines, "s3")[-1] == ("outcome", "succeeded")
    assert _of(lines, "del") == [("received", "submitted"), ("outcome", "succeeded")]
    faults = [(x["action"], x["camera"], x["state"]) for x in lines if x["request_id"] is None]
    assert faults == [("unplug", CAM2, "executed"), ("replug", CAM2, "executed")]


async def test_rotation_keeps_five_files_oldest_first(broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = _with_audit(make_config(broker, state), audit_max_bytes=1024)
    count = 40
    async with agent_and_observer(broker, config) as (app, obs):
        for n in range(count):
            await obs.delete(CAM1, "CAM_B", {"request_id": f"d{n:02}"})
            assert (await obs.outcome(f"d{n:02}")).state == "succeeded"
    audit = state / "audit"
    present = sorted(p.name for p in audit.iterdir())
    assert present == ["audit.jsonl", *(f"audit.jsonl.{n}" for n in range(1, 6))]
    assert all(p.stat().st_size <= 1024 for p in audit.iterdir())
    assert all(_mode(p) == 0o600 for p in audit.iterdir())
    lines = _lines(audit)
    # deletes sent one after the other: received, outcome, received, outcome, …
    expected = [(f"d{n:02}", kind) for n in range(count) for kind in ("received", "outcome")]
    seen = [(line["request_id"], line["kind"]) for line in lines]
    assert seen == expected[-len(seen) :]  # the newest lines, in order; the oldest dropped
    assert seen[-1] == (f"d{count - 1}", "outcome")
    assert len(seen) < len(expected)
    assert app.audit.written == 2 * count
    print(f"audit rotation: {2 * count} lines, 1 KiB files: 6 files keep the last {len(seen)}")


async def test_audit_can_be_turned_off(broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = _with_audit(make_config(broker, state), audit=False)
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.delete(CAM1, "CAM_B", {"request_id": "off"})
        assert (await obs.outcome("off")).state == "succeeded"
    assert (state / "state.json").exists()
    assert not (state / "audit").exists()


def _audit_errors(obs: Observer) -> list[Any]:
    decoded = [msgspec.json.decode(m.payload) for m in obs.on(obs.topics.errors)]
    return [e for e in decoded if e["code"] == "audit_write_failed"]


async def test_unwritable_audit_folder_is_reported_once_and_commands_still_answered(
    broker: Broker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    audit = state / "audit"
    state.mkdir()
    audit.write_text("a file where the audit folder should be")  # fails for root too
    config = make_config(broker, state)
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    async with observe(broker, topics) as obs:
        async with running_agent(config) as app:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            for n in range(3):
                await obs.delete(CAM1, "CAM_B", {"request_id": f"lost{n}"})
                assert (await obs.outcome(f"lost{n}")).state == "succeeded"
            error = (await obs.wait_for(lambda: _audit_errors(obs), what="reported"))[0]
            assert str(audit / "audit.jsonl") in error["message"]
            with anyio.fail_after(20):
                await app.audit.flushed()
            assert (app.audit.lost, app.audit.written) == (6, 0)  # received + outcome each
            audit.unlink()  # the folder can be made again
            await obs.delete(CAM1, "CAM_B", {"request_id": "kept"})
            assert (await obs.outcome("kept")).state == "succeeded"
        assert (app.audit.lost, app.audit.written) == (6, 2)  # stopped: every line is out
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        assert len(_audit_errors(obs)) == 1  # once per spell, not per line
    lines = _lines(audit)
    assert {line["request_id"] for line in lines} == {"kept"}
    assert _mode(audit) == 0o700
    print(f"unwritable audit folder: reported once, {app.audit.lost} lines lost, then resumed")


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "audit", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _rows(output: str) -> list[list[str]]:
    """The plain table's rows below its header, split on runs of 2+ spaces."""
    lines = output.splitlines()
    assert re.split(r"\s{2,}", lines[0])[:3] == ["time (UTC)", "kind", "state"], lines[:1]
    return [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]


def _check_private(state: Path) -> list[Path]:
    """Folders 0700 and files 0600 (the agent ran under umask 0); the rotated audit files."""
    audit, models = state / "audit", state / "models"
    rotated = [p for p in audit.iterdir() if p.name != "audit.jsonl"]
    assert rotated, "1 KiB files: the log was rotated"
    assert [_mode(p) for p in (state, models, audit)] == [0o700] * 3
    files = [state / "state.json", *models.glob("*.blob"), *audit.iterdir()]
    assert len(files) >= 4
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    return rotated


def _on_a_terminal(config: Path) -> str:
    """`oak-agent audit` with its stdout on a pseudo-terminal: what it printed."""
    leader, follower = pty.openpty()
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "audit", "--config", str(config)],
            stdout=follower,
            stderr=subprocess.DEVNULL,
        ) as process:
            os.close(follower)
            follower = -1
            output = b""
            with contextlib.suppress(OSError):  # EIO once the child closed its side
                while chunk := os.read(leader, 65536):
                    output += chunk
            assert process.wait(timeout=60) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return output.decode()


def _check_audit_command(config: Path, tmp_path: Path, count: int) -> None:
    """`oak-agent audit` as a user runs it (not on a terminal: plain aligned columns)."""
    shown = _cli(config)
    assert shown.returncode == 0, shown.stderr
    rows = _rows(shown.stdout)
    assert len(rows) == count
    # (a copy the broker sent again after the restart, if the kill beat the PUBACK: replayed)
    assert [r[1:3] for r in rows if "cut" in r and not r[2].startswith("replayed")] == [
        ["received", "submitted"],
        ["outcome", "failed"],
    ]
    only = _rows(_cli(config, "--request-id", "cut").stdout)
    assert {r[7] for r in only} == {"cut"}
    assert [r[3] for r in only if r[1] == "outcome"] == ["interrupted"]
    assert _rows(_cli(config, "--since", "0").stdout) == []
    assert len(_rows(_cli(config, "--since", "3600").stdout)) == count
    helped = subprocess.run(
        [sys.executable, "-m", "agent.cli", "audit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert helped.returncode == 0
    assert "--request-id ID" in helped.stdout
    assert "exit codes:" in helped.stdout
    bad_since = _cli(config, "--since", "-1")
    assert bad_since.returncode == 2
    assert "--since" in bad_since.stderr

    table = _on_a_terminal(config)
    assert "┃" in table or "│" in table  # rich's table
    assert "cut" in table
    assert "interrupted" in table

    with (tmp_path / "state" / "audit" / "audit.jsonl").open("ab") as damaged:
        damaged.write(b'\xff\xfe{"ts": \n[[[[[\n')  # a torn or tampered line
    mixed = _cli(config, "--request-id", "after")
    assert mixed.returncode == 0
    rows = _rows(mixed.stdout)
    assert [r[7] for r in rows if r[1] != "unreadable"] == ["after", "after"]
    unreadable = [r for r in rows if r[1] == "unreadable"]
    assert len(unreadable) == 2, mixed.stdout  # shown whatever the filters
    assert "audit.jsonl:" in unreadable[0][3]
    assert "not UTF-8 at byte 0" in unreadable[0][3]

    other = tmp_path / "other.toml"
    other.write_text(f'[agent]\nstate_dir = "{tmp_path / "nothing"}"\n')
    missing = _cli(other)
    assert missing.returncode == 2
    assert "no audit log in" in missing.stderr
    (tmp_path / "odd" / "audit" / "audit.jsonl").mkdir(parents=True)
    other.write_text(f'[agent]\nstate_dir = "{tmp_path / "odd"}"\n')
    odd = _cli(other)
    assert odd.returncode == 2
    assert "cannot read" in odd.stderr
    (tmp_path / "odder").mkdir()
    (tmp_path / "odder" / "audit").write_text("not a folder")
    other.write_text(f'[agent]\nstate_dir = "{tmp_path / "odder"}"\n')
    odder = _cli(other)
    assert odder.returncode == 2
    assert "cannot read" in odder.stderr


async def test_interrupted_after_restart_private_files_under_umask_0_and_the_audit_command(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    state = tmp_path / "state"
    config_path = tmp_path / "agent.toml"
    agent_id = f"audit-{os.getpid()}-{tmp_path.name[-6:]}"
    extra = "[security]\naudit_max_bytes = 1024\n"
    write_config(config_path, broker, state, agent_id, boot_seconds=2.0, extra=extra)
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(broker, topics) as obs:
        with agent_process(config_path, tmp_path / "agent.log", umask=0) as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await obs.deploy(CAM1, "CAM_A", {"request_id": "cut", "nn_config": YOLO, "model": blob})
            await obs.wait_for(lambda: "applying" in obs.states("cut"))
            # a SIGKILL loses the lines still queued (documented): kill once it is written
            with anyio.fail_after(10):
                while not _of(_lines(state / "audit"), "cut"):  # noqa: ASYNC110  # another process writes it
                    await anyio.sleep(0.02)
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        with agent_process(config_path, tmp_path / "agent.log", umask=0) as second:
            cut = await obs.outcome("cut")
            assert cut.error is not None
            assert cut.error.code == "interrupted"
            await obs.delete(CAM2, "CAM_A", {"request_id": "after"})
            assert (await obs.outcome("after")).state == "succeeded"
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
    audit = state / "audit"
    lines = _lines(audit)
    cut_lines = [line for line in lines if line["request_id"] == "cut"]
    if cut_lines[-1]["state"] == "replayed":  # the kill beat the PUBACK: the broker resent it
        assert cut_lines.pop()["replayed_state"] == "failed"
    assert [(x["kind"], x["state"]) for x in cut_lines] == [
        ("received", "submitted"),
        ("outcome", "failed"),
    ]
    assert cut_lines[1]["error"]["code"] == "interrupted"
    assert cut_lines[1]["signed"] is None  # not known after the restart
    assert cut_lines[0]["model_sha256"] == _sha(blob)

    rotated = _check_private(state)
    _check_audit_command(config_path, tmp_path, len(lines))
    print(
        f"audit after SIGKILL + restart under umask 0: {len(lines)} lines in "
        f"{len(rotated) + 1} files, all 0600; oak-agent audit shows them"
    )


async def test_the_log_agrees_with_the_answers_across_a_clean_shutdown(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """Commands queued, handled and applied when the agent stops: each ends in the log as
    it ends in the events (its outcome, `rejected`/`shutting_down`, `interrupted` after the
    restart), with exactly one final line."""
    slow = tuple(camera_spec(mxid, boot_seconds=3.0) for mxid in (CAM1, CAM2))
    state = tmp_path / "state"
    config = make_config(broker, state, cameras=slow)
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    blob = own_blobs["yolo_tiny"].read_bytes()
    ids = [f"stop-{i}" for i in range(12)]
    async with observe(broker, topics) as obs:
        async with running_agent(config):
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            for i, request_id in enumerate(ids):
                camera = (CAM1, CAM2)[i % 2]
                stream = ("CAM_A", "CAM_B", "CAM_C")[i % 3]
                body = {"request_id": request_id, "nn_config": YOLO, "model": blob}
                await obs.deploy(camera, stream, body, encoding="msgpack")
            await obs.wait_for(lambda: obs.events(ids[0]), what="the first command handled")
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        async with running_agent(config):
            await obs.wait_for(lambda: all(obs.terminal(i) for i in ids), what="every answer")
    lines = _lines(state / "audit")
    outcomes = []
    for request_id in ids:
        event = obs.terminal(request_id)
        assert event is not None
        final = [
            line
            for line in lines
            if line["request_id"] == request_id
            and (line["kind"] == "outcome" or line["state"] == "rejected")
        ]
        assert len(final) == 1, (request_id, final)
        code = event.error.code if event.error else None
        assert (final[0]["state"], (final[0]["error"] or {}).get("code")) == (event.state, code)
        received = [x for x in lines if x["request_id"] == request_id and x["kind"] == "received"]
        assert received, request_id  # every command has its received line
        outcomes.append((event.state, code))
    print(f"audit across a clean shutdown: {sorted(outcomes)}")


async def test_existing_files_are_tightened_a_torn_line_stays_apart_and_text_is_bounded(
    broker: Broker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    audit = state / "audit"
    audit.mkdir(parents=True)
    audit.chmod(0o755)
    current = audit / "audit.jsonl"
    current.write_bytes(b'{"ts": 1.0, "kind": "rece')  # a line a power cut cut off
    current.chmod(0o644)
    config = make_config(broker, state)
    camera = "A" * 300
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.delete(camera, "CAM_A", {"request_id": "long"})
        assert (await obs.outcome("long")).error.code == "unknown_camera"  # type: ignore[union-attr]
    assert (_mode(audit), _mode(current)) == (0o700, 0o600)
    raw = current.read_bytes().split(b"\n")
    assert raw[0] == b'{"ts": 1.0, "kind": "rece'  # kept as it was, on a line of its own
    line = json.loads(raw[1])
    assert line["request_id"] == "long"
    assert line["camera"].startswith("A" * 256)
    assert line["camera"].endswith("… (300 chars)")
    assert len(line["topic"]) < 300
    assert raw[2:] == [b""]


async def test_signed_commands_carry_their_key_in_the_log(mqtt5: Broker, tmp_path: Path) -> None:
    """With `require_signed`: a signed deploy's lines name its key; an unsigned command and a
    signature that does not verify are one `rejected` line each; knobs alike."""
    state = tmp_path / "state"
    config = msgspec.structs.replace(make_config(mqtt5, state), security=security())
    async with agent_and_observer(mqtt5, config) as (_, obs):
        topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        good = signed(topic, deploy_body("good"))
        await publish(obs, topic, good)
        assert (await obs.outcome("good")).state == "succeeded"
        await obs.deploy(CAM1, "CAM_A", deploy_body("plain"))
        assert (await obs.outcome("plain")).error.code == "unauthorized"  # type: ignore[union-attr]
        await publish(obs, topic, signed(topic, deploy_body("forged"), STRANGER, "ops"))
        assert (await obs.outcome("forged")).error.code == "bad_signature"  # type: ignore[union-attr]
        knob = obs.topics.simulator(CAM2, "unplug")
        await obs.send(knob, b"")  # unsigned: refused
        await publish(obs, knob, signed(knob, b""))
        await obs.wait_for(lambda: obs.latest(obs.topics.camera_availability(CAM2)) == b"offline")
    lines = _lines(state / "audit")
    who = {
        (x["request_id"] or x["action"], x["kind"]): (x["signed"], x["key_id"], x["state"])
        for x in lines
    }
    assert who[("good", "received")] == (True, "ops", "submitted")
    assert who[("good", "outcome")] == (True, "ops", "succeeded")
    assert who[("plain", "received")] == (False, None, "rejected")
    assert who[("forged", "received")] == (True, None, "rejected")
    assert [(x["request_id"], x["kind"]) for x in lines if x["request_id"] != "good"] == [
        ("plain", "received"),
        ("forged", "received"),
        (None, "received"),
        (None, "received"),
    ]
    knobs = [(x["signed"], x["key_id"], x["state"]) for x in lines if x["action"] == "unplug"]
    assert knobs == [(False, None, "ignored"), (True, "ops", "executed")]
    received = next(x for x in lines if x["request_id"] == "good")
    assert (received["payload_sha256"], received["payload_bytes"]) == (_sha(good[0]), len(good[0]))


async def test_a_group_command_is_one_received_line_and_an_outcome_per_camera(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["ssd_tiny"].read_bytes()
    state = tmp_path / "state"
    group = "hall"
    config = make_config(broker, state, groups=(group,))
    topic = Topics.for_agent("oaktest", "any", (group,)).group_command(group, "deploy")
    every: dict[str, Any] = {
        "request_id": "g-all",
        "nn_config": {"type": "MobileNet"},
        "model": blob,
        "target": {"cameras": ["*"], "stream": "CAM_A"},
    }
    none = {
        **every,
        "request_id": "g-none",
        "target": {"cameras": ["NOSUCHNAME"], "stream": "CAM_A"},
    }
    bad = {"request_id": "g-bad", "nn_config": {"type": "MobileNet"}, "model": blob}
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.send(topic, msgspec.msgpack.encode(every))
        await obs.wait_for(
            lambda: {e.camera for e in obs.events("g-all") if e.terminal} >= {CAM1, CAM2},
            what="g-all answered by both cameras",
        )
        await obs.send(topic, msgspec.msgpack.encode(none))
        await obs.wait_for(lambda: "skipped" in obs.states("g-none"), what="g-none skipped")
        await obs.send(topic, msgspec.msgpack.encode(bad))  # no target
        await obs.wait_for(lambda: "rejected" in obs.states("g-bad"), what="g-bad rejected")
    lines = _lines(state / "audit")
    assert all(set(line) == FIELDS for line in lines), lines[0]
    received = next(x for x in lines if x["request_id"] == "g-all" and x["kind"] == "received")
    assert (received["topic"], received["camera"], received["state"]) == (topic, "", "submitted")
    assert received["stream"] == "CAM_A"
    assert received["model_sha256"] == _sha(blob)
    assert received["payload_sha256"] == _sha(msgspec.msgpack.encode(every))
    outcomes = {
        x["camera"]: x["state"]
        for x in lines
        if x["request_id"] == "g-all" and x["kind"] == "outcome"
    }
    assert outcomes == {CAM1: "succeeded", CAM2: "succeeded"}
    assert _of(lines, "g-none") == [("received", "skipped")]
    assert _of(lines, "g-bad") == [("received", "rejected")]
    refused = next(x for x in lines if x["request_id"] == "g-bad")
    assert refused["error"]["code"] == "invalid_payload"
