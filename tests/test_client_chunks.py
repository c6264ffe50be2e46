"""`oak-agent upload | models | deploy --model` through size-capped brokers, as a user runs them.

A mosquitto capped at 128 KiB per packet (MQTT 5: it says so in its CONNACK) and the embedded
amqtt broker (3.1.1: the user passes `--max-packet`); the agent runs as a subprocess; an
observer subscribed to `{base}/#` counts the chunks that pass the broker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import uuid
from typing import TYPE_CHECKING

import aiomqtt
import anyio
import pytest

from agent.chunkplan import publish_packet_size
from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import BrokerUnavailable, free_port, mosquitto_path, run_broker
from tests.harness import CAM1, WAIT, Observer, observe
from tests.httpserver import file_server
from tests.test_client import (
    OAK,
    ROOT,
    Kind,
    Result,
    _no_traceback,
    _read_until_closed,
    cli_process,
    oak,
    running_target,
)
from tests.uploader import padded_model

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from anyio.abc import ByteReceiveStream, Process

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

CAP = 131072
BLOB = "Laserscan_10_1_shaves1"  # small outputs: its Generic layers fit the cap


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A mosquitto that disconnects any client sending a packet above 128 KiB."""
    if mosquitto_path() is None:
        pytest.skip("needs mosquitto (max_packet_size)")
    settings = ("allow_anonymous true", f"max_packet_size {CAP}")
    try:
        with run_broker("mosquitto", tmp_path_factory.mktemp("capped"), settings=settings) as b:
            yield b
    except BrokerUnavailable as exc:
        pytest.fail(f"cannot start mosquitto: {exc}")


def _model(wheel_blobs: dict[str, Path], folder: Path, size: int, seed: int) -> Path:
    path = folder / f"model-{seed}.blob"
    path.write_bytes(padded_model(wheel_blobs[BLOB], size, seed=seed))
    return path


@contextlib.asynccontextmanager
async def capped_agent(capped: Broker, tmp_path: Path) -> AsyncIterator[tuple[Path, Observer]]:
    """The agent (subprocess) on the capped broker; its config and an observer."""
    agent_id = f"chunks-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "agent.toml", capped, tmp_path / "state", agent_id)
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(capped, topics) as obs:
        with agent_process(config, tmp_path / "agent.log"):
            await obs.wait_for(
                lambda: obs.latest(topics.availability) == b"online", what="agent online"
            )
            await obs.wait_for(lambda: obs.latest(topics.models) is not None, what="models")
            yield config, obs


def chunks_seen(obs: Observer, sha256: str, after: int = 0) -> list[int]:
    """Offsets of the chunks of `sha256` the broker passed, in order, from message `after` on."""
    prefix = f"{obs.topics.base}/models/{sha256}/chunks/"
    return [int(m.topic[len(prefix) :]) for m in obs.messages[after:] if m.topic.startswith(prefix)]


def _states(result: Result) -> list[str]:
    return [json.loads(line)["state"] for line in result.out.splitlines()]


async def _round_trip(broker: Broker, protocol: aiomqtt.ProtocolVersion, size: int) -> int:
    """Publish `size` bytes and receive them back; the length received."""
    topic = f"sizing/{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(broker.host, broker.port, protocol=protocol) as client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"x" * size, qos=1, timeout=5)
        with anyio.fail_after(WAIT):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return len(message.payload)
    raise AssertionError("no message")


@pytest.mark.parametrize("mqtt5", [True, False])
async def test_the_computed_packet_size_is_what_the_broker_counts(
    capped: Broker, mqtt5: bool
) -> None:
    protocol = aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311
    topic = "sizing/01234567"  # as long as the topics _round_trip uses
    fits = CAP - publish_packet_size(topic, 0, mqtt5=mqtt5)
    while publish_packet_size(topic, fits, mqtt5=mqtt5) > CAP:
        fits -= 1
    assert publish_packet_size(topic, fits, mqtt5=mqtt5) == CAP
    assert await _round_trip(capped, protocol, fits) == fits
    # mosquitto 2.0.11 lets one byte over pass; a few more and it cuts the sender off
    with pytest.raises(aiomqtt.MqttError):
        await _round_trip(capped, protocol, fits + 16)


async def test_deploy_of_a_large_model_goes_in_chunks_by_itself(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 3_000_000, seed=21)
    async with capped_agent(capped, tmp_path) as (config, obs):
        result = await oak(
            "deploy", "--config", str(config), "--camera", CAM1, "--stream", "CAM_A",
            "--model", str(model), "--request-id", "big",
        )  # fmt: skip
        command = obs.on(obs.topics.command(CAM1, "CAM_A", "deploy"))
        online = obs.latest(obs.topics.availability)
    _no_traceback(result)
    assert result.code == 0, result
    assert (
        "does not fit the broker's packet limit (131.1 KB): sending the model in chunks"
        in result.err
    )
    assert _states(result) == ["accepted", "applying", "succeeded"]
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    offsets = chunks_seen(obs, sha)
    assert offsets == sorted(set(offsets))  # each chunk once
    assert len(offsets) == -(-3_000_000 // offsets[1])
    assert f"sent {len(offsets)} chunks of {offsets[1]} bytes" in result.err
    assert len(command) == 1
    body = json.loads(command[0].payload)
    assert body["model_sha256"] == sha
    assert "model" not in body
    assert online == b"online"


async def test_an_interrupted_upload_sends_only_what_is_missing_when_run_again(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    size, chunk = 6_000_000, 16_384
    model = _model(wheel_blobs, tmp_path, size, seed=22)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    total = -(-size // chunk)
    async with capped_agent(capped, tmp_path) as (config, obs):
        args = [
            "upload",
            "--config",
            str(config),
            "--model",
            str(model),
            "--chunk-size",
            str(chunk),
        ]
        with anyio.fail_after(WAIT):
            async with cli_process(*args) as first:
                await obs.wait_for(lambda: len(chunks_seen(obs, sha)) >= 40, what="40 chunks")
                first.process.send_signal(signal.SIGINT)
                await first.exited()
        interrupted = first.result()
        sent_before = set(chunks_seen(obs, sha))
        assert len(sent_before) < total, "the upload ended before it could be interrupted"
        # the agent has (journaled) every chunk the broker passed
        status_topic = obs.topics.upload_status(sha)
        received = sum(min(chunk, size - o) for o in sent_before)
        await obs.wait_for(
            lambda: (obs.latest_json(status_topic) or {}).get("received") == received,
            what=f"status received={received}",
        )
        mark = len(obs.messages)
        again = await oak(*args, "--name", "resumed.blob")
        sent_again = chunks_seen(obs, sha, after=mark)
        listed = await oak("models", "--config", str(config))
        listed_json = await oak("models", "--config", str(config), "--json")
    _no_traceback(interrupted)
    assert interrupted.code == 130, interrupted
    assert "run the same command again" in interrupted.err
    _no_traceback(again)
    assert again.code == 0, again
    assert json.loads(again.out)["state"] == "stored"
    assert sorted(sent_again) == sent_again
    assert set(sent_again) == set(range(0, size, chunk)) - sent_before  # only what was missing
    assert len(sent_again) == len(set(sent_again))
    assert f"sent {len(sent_again)} chunks" in again.err
    assert listed.code == 0, listed
    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["sha256", "size", "name"]
    assert any(row.startswith(f"{sha}  6.0 MB") for row in rows), listed.out
    entries = json.loads(listed_json.out)
    assert [e["size"] for e in entries if e["sha256"] == sha] == [size]


async def test_an_upload_run_again_at_once_waits_for_the_agent_to_catch_up(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    # the agent is stopped (SIGSTOP) while the first run sends, so the broker holds a backlog
    # of chunks for it; the second run starts as the agent wakes up and works through them
    size, chunk = 3_000_000, 16_384
    model = _model(wheel_blobs, tmp_path, size, seed=30)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    total = -(-size // chunk)
    agent_id = f"chunks-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "agent.toml", capped, tmp_path / "state", agent_id)
    topics = Topics.for_agent("oaktest", agent_id)
    args = ["upload", "--config", str(config), "--model", str(model), "--chunk-size", str(chunk)]
    async with observe(capped, topics) as obs:
        with agent_process(config, tmp_path / "agent.log") as agent:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await obs.wait_for(lambda: obs.latest(topics.models) is not None, what="models")
            manifests = topics.upload(sha)
            with anyio.fail_after(WAIT):
                async with cli_process(*args) as first:
                    await obs.wait_for(lambda: obs.latest(topics.upload_status(sha)) is not None)
                    agent.signal(signal.SIGSTOP)
                    try:
                        await obs.wait_for(lambda: len(chunks_seen(obs, sha)) >= total // 2)
                        first.process.send_signal(signal.SIGINT)
                        await first.exited()
                        async with cli_process(*args) as second:
                            # the agent wakes up to the backlog and the second manifest
                            await obs.wait_for(lambda: len(obs.on(manifests)) == 2)
                            agent.signal(signal.SIGCONT)
                            await second.exited()
                    finally:
                        agent.signal(signal.SIGCONT)
            again = second.result()
            every = chunks_seen(obs, sha)
    assert first.result().code == 130, first.result()
    _no_traceback(again)
    assert again.code == 0, again
    assert set(every) == set(range(0, size, chunk))
    # at most the chunks in flight when the first run stopped go twice
    assert len(every) <= total + 8, (len(every), total, again.err)


async def test_an_upload_of_a_stored_model_sends_nothing(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 400_000, seed=23)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    async with capped_agent(capped, tmp_path) as (config, obs):
        first = await oak("upload", "--config", str(config), "--model", str(model))
        mark = len(obs.messages)
        second = await oak("upload", "--config", str(config), "--model", str(model))
        resent = chunks_seen(obs, sha, after=mark)
    assert (first.code, second.code) == (0, 0), (first, second)
    assert resent == []
    assert "stored; sent 0 chunks" in second.err


async def test_a_chunk_size_above_the_cap_is_refused_before_sending(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 400_000, seed=24)
    async with capped_agent(capped, tmp_path) as (config, obs):
        result = await oak(
            "upload", "--config", str(config), "--model", str(model), "--chunk-size", "200000"
        )
        chunks = [m for m in obs.messages if "/chunks/" in m.topic]
    assert result.code == 2, result
    assert (
        "--chunk-size 200000 does not fit: at most 126976 bytes in a packet of 131072" in result.err
    )
    assert chunks == []


async def test_amqtt_with_max_packet(
    broker: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 1_000_000, seed=25)
    async with running_target("amqtt", broker, tmp_path) as (target, obs):
        sha = hashlib.sha256(model.read_bytes()).hexdigest()
        deployed = await oak(
            "deploy", *target.flags, "--camera", CAM1, "--stream", "CAM_A",
            "--model", str(model), "--max-packet", "131072",
        )  # fmt: skip
        offsets = chunks_seen(obs, sha)
        listed = await oak("models", *target.flags)
    _no_traceback(deployed)
    assert deployed.code == 0, deployed
    assert _states(deployed) == ["accepted", "applying", "succeeded"]
    assert len(offsets) == -(-1_000_000 // offsets[1])
    assert (
        publish_packet_size(target.topics.chunk(sha, offsets[-1]), offsets[1], mqtt5=False) <= CAP
    )
    assert listed.code == 0, listed
    assert sha in listed.out
    assert f"{CAM1}/CAM_A" in listed.out


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_deploy_by_url(
    kind: Kind, broker: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    data = padded_model(wheel_blobs[BLOB], 2_000_000, seed=26)
    sha = hashlib.sha256(data).hexdigest()
    with file_server(data, plan=[("drop", 700_000)]) as files:
        url = files.url.replace("http://", "http://fleet:pa55word@") + "?X-Amz-Signature=s3cr3t"
        async with running_target(kind, broker, tmp_path) as (target, _):
            deployed = await oak(
                "deploy", *target.flags, "--camera", CAM1, "--stream", "CAM_A",
                "--model-url", url, "--model-sha256", sha, "--model-size", str(len(data)),
            )  # fmt: skip
            files.always_status = 404
            missing = await oak(
                "deploy", *target.flags, "--camera", CAM1, "--stream", "CAM_B",
                "--model-url", url, "--model-sha256", "0" * 64,
            )  # fmt: skip
        ranges = [r.headers.get("range") for r in files.requests]
    _no_traceback(deployed)
    assert deployed.code == 0, deployed
    events = [json.loads(line) for line in deployed.out.splitlines()]
    states = [e["state"] for e in events]
    assert states[0] == "accepted"
    assert states[-2:] == ["applying", "succeeded"]
    assert "transferring" in states
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress
    assert progress[-1]["total"] == len(data)
    assert ranges[:2] == [None, "bytes=700000-"]  # the agent resumed after the cut
    assert missing.code == 1, missing
    failed = json.loads(missing.out.splitlines()[-1])
    assert failed["error"]["code"] == "download_failed"
    assert "404" in failed["error"]["message"]
    for secret in ("pa55word", "s3cr3t", "X-Amz"):
        assert secret not in deployed.out + missing.out + missing.err


async def test_deploy_source_arguments_are_checked(tmp_path: Path) -> None:
    where = ["--agent", "a", "--port", "1", "--camera", CAM1, "--stream", "CAM_A"]
    sha = "ab" * 32
    for extra, says in (
        (["--model-url", "https://m.example/x.blob"], "--model-url needs --model-sha256"),
        (["--model", "x.blob", "--model-sha256", sha], "--model goes alone"),
        (["--model-sha256", sha, "--model-size", "10"], "--model-size goes with --model-url"),
        ([], "one of --model, --model-url or --model-sha256 is required"),
        (["--model-sha256", "xyz"], "is not a sha256"),
        (["--model-sha256", sha, "--chunk-size", "100"], "a chunk has at least 4096 bytes"),
    ):
        result = await oak("deploy", *where, *extra)
        assert result.code == 2, (extra, result)
        assert says in result.err, (extra, result.err)


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme.index("A worked example, to paste into a terminal")
    start = readme.index("```sh\n", after) + len("```sh\n")
    return readme[start : readme.index("```\n", start)]


async def test_the_readme_example_works_when_pasted(tmp_path: Path) -> None:
    if mosquitto_path() is None:
        pytest.skip("the example needs mosquitto")
    script = 'trap "kill $WEB $AGENT $MOSQUITTO 2>/dev/null" EXIT\n' + _readme_example()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = await anyio.open_process(
        ["bash", "-c", script], cwd=ROOT, env=env, start_new_session=True
    )
    try:
        with anyio.fail_after(240):
            out, err = await _communicate(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    text, errors = out.decode(), err.decode()
    assert process.returncode == 0, (text, errors)
    # the only traceback allowed: Python's own, for a Ctrl-C (`timeout -s INT`) that lands
    # while the interpreter is still importing the client (this machine may be that slow)
    for trace in errors.split("Traceback (most recent call last):")[1:]:
        assert trace.strip().splitlines()[-1] == "KeyboardInterrupt", errors
    stored = [line for line in text.splitlines() if line.startswith('{"state":"stored"')]
    assert 1 <= len(stored) <= 2, text  # the first upload too, when it beat the interruption
    (folder,) = [path async for path in anyio.Path(tmp_path).glob("tmp.*")]
    sha = hashlib.sha256(await (folder / "big.blob").read_bytes()).hexdigest()
    assert f"{sha}  20.0 MB  big.blob" in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith('{"request_id"')]
    assert [e["state"] for e in events if e["state"] in ("succeeded", "failed", "rejected")] == [
        "succeeded",
        "succeeded",
    ]
    assert any(e["state"] == "transferring" and "progress" in e for e in events)
    assert "stored; sent 0 chunks" in errors  # the deploy found the uploaded model
    if "interrupted; run the same command again" in errors:  # the machine was not too fast
        sent = [int(n) for n in re.findall(r"stored; sent (\d+) chunks", errors)]
        assert 0 < sent[0] < -(-20_000_000 // 4096), errors


async def _communicate(process: Process) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()

    async def pump(stream: ByteReceiveStream, into: bytearray) -> None:
        async for chunk in stream:
            into.extend(chunk)

    async with anyio.create_task_group() as tg:
        assert process.stdout is not None
        assert process.stderr is not None
        tg.start_soon(pump, process.stdout, out)
        tg.start_soon(pump, process.stderr, err)
        await process.wait()
    return bytes(out), bytes(err)


async def test_an_upload_the_agent_refuses_exits_1_with_its_error(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 400_000, seed=27)
    agent_id = f"chunks-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "agent.toml", capped, tmp_path / "state", agent_id)
    with config.open("a") as toml:
        toml.write("\n[models]\nmax_partial_bytes = 100000\n")
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(capped, topics) as obs:
        with agent_process(config, tmp_path / "agent.log"):
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            result = await oak("upload", "--config", str(config), "--model", str(model))
            chunks = [m for m in obs.messages if "/chunks/" in m.topic]
    _no_traceback(result)
    assert result.code == 1, result
    assert json.loads(result.out)["state"] == "failed"
    assert f"upload of {model.name} failed (storage_full)" in result.err
    assert chunks == []


async def test_upload_and_models_without_a_broker_or_an_agent(
    broker: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 10_000, seed=28)
    nowhere = ["--port", str(free_port()), "--agent", "nobody"]
    unreachable = await oak("upload", *nowhere, "--model", str(model))
    no_list = await oak("models", *nowhere)
    silent = await oak(
        "models", "--port", str(broker.port), "--agent", f"none-{uuid.uuid4().hex[:6]}",
        "--timeout", "1",
    )  # fmt: skip
    missing = await oak("upload", "--port", str(broker.port), "--agent", "a", "--model", "nope")
    for result in (unreachable, no_list, silent, missing):
        _no_traceback(result)
    assert unreachable.code == 4, unreachable
    assert "cannot connect to the MQTT broker at 127.0.0.1" in unreachable.err
    assert no_list.code == 4, no_list
    assert silent.code == 3, silent
    assert "published no model list within 1 s" in silent.err
    assert missing.code == 2, missing
    assert "cannot read nope" in missing.err


async def test_upload_on_a_terminal_draws_a_progress_bar(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 1_000_000, seed=29)
    async with capped_agent(capped, tmp_path) as (config, _):
        master, slave = os.openpty()
        try:
            with anyio.fail_after(WAIT):
                process = await anyio.open_process(
                    [*OAK, "upload", "--config", str(config), "--model", str(model)],
                    stderr=slave, cwd=ROOT,
                )  # fmt: skip
                os.close(slave)
                slave = -1
                async with process:
                    shown = await anyio.to_thread.run_sync(_read_until_closed, master)
                    await process.wait()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
    assert process.returncode == 0
    text = shown.decode(errors="replace")
    assert f"upload {model.name}" in text
    assert "1.0/1.0 MB" in text  # rich's bar at its end
    assert "%" not in text.replace("100%", "")  # not the plain lines


async def test_a_signed_deploy_of_a_large_model_uploads_then_signs_the_deploy(
    capped: Broker, wheel_blobs: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(wheel_blobs, tmp_path, 1_000_000, seed=31)
    made = await oak("keygen", "--out", str(tmp_path / "keys"), "--key-id", "operator")
    assert made.code == 0, made
    snippet = made.out[made.out.index("[security]") :]
    agent_id = f"chunks-{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "agent.toml", capped, tmp_path / "state", agent_id, mqtt_extra="\n" + snippet
    )
    topics = Topics.for_agent("oaktest", agent_id)
    target = ("--config", str(config), "--camera", CAM1, "--stream", "CAM_A", "--model", str(model))
    async with observe(capped, topics) as obs:
        with agent_process(config, tmp_path / "agent.log"):
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            signed = await oak(
                "deploy", *target, "--sign-key", str(tmp_path / "keys" / "operator.key")
            )
            unsigned = await oak("deploy", *target)
            command = obs.on(topics.command(CAM1, "CAM_A", "deploy"))
    _no_traceback(signed)
    assert signed.code == 0, signed
    assert "sending the model in chunks first" in signed.err
    assert _states(signed) == ["accepted", "applying", "succeeded"]
    assert unsigned.code == 1, unsigned  # the agent requires signed commands
    assert json.loads(unsigned.out.splitlines()[-1])["error"]["code"] == "unauthorized"
    first = command[0]
    assert first.properties is not None  # MQTT 5: the signature in user properties
    names = [name for name, _ in getattr(first.properties, "UserProperty", [])]
    assert len(names) == 2, names
    assert (
        json.loads(first.payload)["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    )
