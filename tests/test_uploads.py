"""Chunked model uploads over MQTT, through a mosquitto that caps packets at 128 KiB."""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING, Any

import aiomqtt
import anyio
import msgspec
import pytest

from tests.brokers import BrokerUnavailable, mosquitto_path, run_broker
from tests.harness import CAM1, CAM2, agent_and_observer, make_config
from tests.uploader import KIB, chunks, padded_model, send_chunks, send_manifest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from agent.topics import Topics
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

GENERIC = {"type": "Generic"}
CHUNK = 96 * KIB
MODEL_SIZE = 3_000_000  # not a multiple of CHUNK: the last chunk is shorter
CAP = 131072


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


@pytest.fixture(scope="module")
def model(wheel_blobs: dict[str, Path]) -> bytes:
    """A real third-party blob (small outputs: its layers fit the cap) padded to 3 MB."""
    return padded_model(wheel_blobs["Laserscan_10_1_shaves1"], MODEL_SIZE)


@pytest.fixture
async def sender(capped: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        capped.host, capped.port, identifier=f"sender-{uuid.uuid4().hex[:8]}"
    ) as client:
        yield client


def status(obs: Observer, sha256: str) -> dict[str, Any] | None:
    payload = obs.latest(obs.topics.upload_status(sha256))
    return msgspec.json.decode(payload) if payload else None


async def until_status(obs: Observer, sha256: str, state: str, **fields: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        current = status(obs, sha256)
        if current is None or current["state"] != state:
            return None
        return current if all(current.get(k) == v for k, v in fields.items()) else None

    return await obs.wait_for(found, what=f"upload status {state} {fields}")


async def until_error(obs: Observer, sha256: str, code: str, saying: str = "") -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        current = status(obs, sha256)
        error = current.get("error") if current else None
        wanted = error and error["code"] == code and saying in error["message"]
        return current if wanted else None

    return await obs.wait_for(found, what=f"upload error {code}")


async def test_upload_through_capped_broker_then_deploy(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    config = make_config(capped, tmp_path / "state")
    async with agent_and_observer(capped, config) as (app, obs):
        topics = obs.topics
        sha = await send_manifest(sender, topics, model, CHUNK, model_name="laserscan-padded")
        first = await until_status(obs, sha, "receiving")
        assert first["received"] == 0
        assert first["missing"] == [[0, MODEL_SIZE]]
        assert first["chunk_size"] == CHUNK
        await send_chunks(sender, topics, model, CHUNK, chunks(MODEL_SIZE, CHUNK))
        stored = await until_status(obs, sha, "stored")
        assert stored["received"] == MODEL_SIZE
        assert stored["missing"] == []
        published = len(obs.on(topics.upload_status(sha)))
        print(f"statuses published for {len(chunks(MODEL_SIZE, CHUNK))} chunks: {published}")
        assert published < len(chunks(MODEL_SIZE, CHUNK))  # rate-limited, not one per chunk
        assert (tmp_path / "state" / "models" / f"{sha}.blob").read_bytes() == model
        assert not list((tmp_path / "state" / "uploads").iterdir())

        body = {"request_id": "by-sha", "nn_config": GENERIC, "model_sha256": sha}
        await obs.deploy(CAM1, "CAM_B", body)
        assert (await obs.outcome("by-sha")).state == "succeeded"
        assert obs.states("by-sha") == ["accepted", "applying", "succeeded"]

        listed = await obs.wait_for(
            lambda: next(
                (
                    m
                    for m in obs.latest_json(topics.models) or []
                    if m["sha256"] == sha and m["in_use_by"]
                ),
                None,
            ),
            what="the model in the models list, in use",
        )
        assert listed["size"] == MODEL_SIZE
        assert listed["name"] == "laserscan-padded"
        assert listed["in_use_by"] == [f"{CAM1}/CAM_B"]

        # the same model inline does not fit through this broker: it drops the sender
        connects = app.link.stats.connects
        inline = msgspec.msgpack.encode(
            {"request_id": "inline", "nn_config": GENERIC, "model": model}
        )
        with pytest.raises(aiomqtt.MqttError):
            await _publish_alone(capped, topics.command(CAM2, "CAM_B", "deploy"), inline)
        # the agent stays up, on the same connection, and keeps serving
        body = {"request_id": "after", "nn_config": GENERIC, "model_sha256": sha}
        await obs.deploy(CAM2, "CAM_B", body)
        assert (await obs.outcome("after")).state == "succeeded"
        assert obs.events("inline") == []
        assert app.link.stats.connects == connects
        assert obs.latest(topics.availability) == b"online"

        # a manifest for a model the agent stores answers `stored` at once
        await sender.publish(topics.upload_status(sha), b"", qos=1, retain=True)
        await send_manifest(sender, topics, model, CHUNK)
        again = await until_status(obs, sha, "stored")
        assert again["received"] == MODEL_SIZE


async def _publish_alone(broker: Broker, topic: str, payload: bytes) -> None:
    """Publish from a client of its own, then another message to see it still connected."""
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(topic, payload, qos=1, timeout=10)
        await client.publish(topic, b"{}", qos=1, timeout=10)


async def _start(sender: aiomqtt.Client, topics: Topics, data: bytes, chunk: int) -> str:
    return await send_manifest(sender, topics, data, chunk)


async def test_bad_chunks_and_manifests_are_answered_on_status(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    data = model[: 20 * 4 * KIB + 100]
    chunk = 4 * KIB
    config = make_config(capped, tmp_path / "state")
    async with agent_and_observer(capped, config) as (app, obs):
        topics = obs.topics
        sha = hashlib.sha256(data).hexdigest()
        # chunks before any manifest
        await sender.publish(topics.chunk(sha, 0), data[:chunk], qos=1)
        refused = await until_error(obs, sha, "upload_not_found")
        assert refused["state"] == "failed"

        await _start(sender, topics, data, chunk)
        await until_status(obs, sha, "receiving", error=None)
        cases = [
            (len(data) + chunk, data[:chunk], "outside the model"),
            (chunk + 1, data[:chunk], "not a multiple"),
            (0, data[: chunk - 1], "must have 4096"),
            (20 * chunk, data[-99:], "must have 100"),
        ]
        for n, (offset, payload, reason) in enumerate(cases, start=1):
            await sender.publish(topics.chunk(sha, offset), payload, qos=1)
            error = (await until_error(obs, sha, "invalid_chunk"))["error"]
            assert reason in error["message"]
            assert status(obs, sha)["state"] == "receiving"  # type: ignore[index]
            # a good chunk clears the error; the upload went on
            good = n * chunk
            await sender.publish(topics.chunk(sha, good), data[good : good + chunk], qos=1)
            await until_status(obs, sha, "receiving", error=None, received=n * chunk)
        # a burst of refused chunks: the status goes out at most every 0.5 s, not per chunk
        before = len(obs.on(topics.upload_status(sha)))
        for _ in range(50):
            await sender.publish(topics.chunk(sha, 0), b"short", qos=1)
        await sender.publish(topics.chunk(sha, 0), data[:chunk], qos=1)
        await until_status(obs, sha, "receiving", error=None, received=(len(cases) + 1) * chunk)
        burst = len(obs.on(topics.upload_status(sha))) - before
        print(f"statuses for 50 refused chunks and one good one: {burst}")
        assert burst < 50
        # a retained manifest is never acted on
        await sender.publish(
            topics.upload(sha), b'{"size": 1, "chunk_size": 4096}', retain=True, qos=1
        )
        await until_error(obs, sha, "retained_command")
        await sender.publish(topics.upload(sha), b"", retain=True, qos=1)
        # an offset that is not a number
        await sender.publish(f"{topics.base}/models/{sha}/chunks/-4", data[:chunk], qos=1)
        assert "not decimal" in (await until_error(obs, sha, "invalid_chunk"))["error"]["message"]
        # a garbage manifest while it runs: an error, and the upload goes on
        await sender.publish(topics.upload(sha), b"\x93garbage", qos=1)
        await until_error(obs, sha, "invalid_payload")
        await sender.publish(topics.upload(sha), b'{"size": 1, "chunk_size": 4096}', qos=1)
        changed = await until_error(obs, sha, "invalid_payload", "`$.size`")
        assert "differs from the upload in progress" in changed["error"]["message"]
        assert changed["state"] == "receiving"
        # retained chunks are never written
        await sender.publish(topics.chunk(sha, 0), data[:chunk], qos=1, retain=True)
        await until_error(obs, sha, "retained_command")
        await sender.publish(topics.chunk(sha, 0), b"", qos=1, retain=True)

        # a garbage manifest with no upload, and manifests that break the rules
        other = hashlib.sha256(b"other").hexdigest()
        for payload, where in [
            (b"not json", "$"),
            (b'{"size": 10, "chunk_size": 100}', "$.chunk_size"),
            (b'{"size": 0, "chunk_size": 4096}', "$.size"),
            (b'{"size": 10, "chunk_size": 999999999}', "$.chunk_size"),
            (b'{"size": 10, "chunk_size": 4096, "expires_at": 5}', None),
        ]:
            await sender.publish(topics.upload(other), b"", qos=1, retain=True)
            await sender.publish(topics.upload(other), payload, qos=1)
            code = "expired" if where is None else "invalid_payload"
            answer = await until_error(obs, other, code, "" if where is None else f"`{where}`")
            assert answer["state"] == "failed"
            await sender.publish(topics.upload_status(other), b"", qos=1, retain=True)
            await obs.wait_for(lambda: status(obs, other) is None)
        assert app.uploads is not None
        assert app.uploads.in_progress(sha)  # through all of it, the upload went on


async def test_upload_abandoned_after_upload_timeout_and_storage_full(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    config = make_config(capped, tmp_path / "state")
    models = msgspec.structs.replace(
        config.models, upload_timeout=3.0, max_partial_bytes=MODEL_SIZE + 10
    )
    config = msgspec.structs.replace(config, models=models)
    async with agent_and_observer(capped, config) as (_, obs):
        topics = obs.topics
        sha = await send_manifest(sender, topics, model, CHUNK)
        await until_status(obs, sha, "receiving")
        # a second one would exceed max_partial_bytes
        other = model[:20_000]
        other_sha = await send_manifest(sender, topics, other, 4 * KIB)
        full = await until_error(obs, other_sha, "storage_full")
        assert full["state"] == "failed"
        assert (full["size"], full["received"], full["missing"]) == (20_000, 0, [[0, 20_000]])
        assert "max_partial_bytes" in full["error"]["message"]
        await send_chunks(sender, topics, model, CHUNK, [0])
        await until_status(obs, sha, "receiving", received=CHUNK)
        body = {"request_id": "waits", "nn_config": GENERIC, "model_sha256": sha}
        await obs.deploy(CAM1, "CAM_B", body)
        # then nothing for upload_timeout: abandoned, partial deleted, the deploy fails
        with anyio.fail_after(20):
            abandoned = await until_status(obs, sha, "failed")
        assert abandoned["error"]["code"] == "upload_timeout"
        failed = await obs.outcome("waits")
        assert failed.error is not None
        assert failed.error.code == "upload_timeout"
        assert obs.states("waits")[:2] == ["accepted", "transferring"]
        assert not list((tmp_path / "state" / "uploads").iterdir())
        # room again
        await send_manifest(sender, topics, other, 4 * KIB)
        await until_status(obs, other_sha, "receiving")


async def test_a_deploy_waits_for_the_upload_in_progress(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    total = chunks(MODEL_SIZE, CHUNK)
    config = make_config(capped, tmp_path / "state")
    async with agent_and_observer(capped, config) as (app, obs):
        topics = obs.topics
        sha = await send_manifest(sender, topics, model, CHUNK)
        await send_chunks(sender, topics, model, CHUNK, total[:10])
        await until_status(obs, sha, "receiving", received=10 * CHUNK)
        body = {"request_id": "waits", "nn_config": GENERIC, "model_sha256": sha}
        await obs.deploy(CAM1, "CAM_B", body)
        await obs.wait_for(lambda: "transferring" in obs.states("waits"), what="transferring")
        first = next(e for e in obs.events("waits") if e.state == "transferring")
        assert first.progress is not None
        assert (first.progress.received, first.progress.total) == (10 * CHUNK, MODEL_SIZE)
        # a deploy for another camera meanwhile is not held up by it
        other = {"request_id": "other", "nn_config": GENERIC, "model_sha256": "0" * 64}
        await obs.deploy(CAM2, "CAM_B", other)
        rejected = await obs.outcome("other")
        assert rejected.error is not None
        assert rejected.error.code == "model_not_found"  # at once, while CAM1's waits
        await send_chunks(sender, topics, model, CHUNK, total[10:])
        done = await obs.outcome("waits")
        assert done.state == "succeeded", done
        states = obs.states("waits")
        assert states[0] == "accepted"
        assert states[-2:] == ["applying", "succeeded"]
        assert set(states[1:-2]) == {"transferring"}
        progress = [e.progress for e in obs.events("waits") if e.progress is not None]
        print(f"transferring events for {len(total)} chunks: {len(progress)}")
        # the first, then each tenth or each second, the last: not one per chunk
        assert len(progress) < len(total)
        assert progress[-1] is not None
        assert progress[-1].received == MODEL_SIZE
        assert app.coordinator.workers[CAM1].running["CAM_B"].model.sha256 == sha


async def test_a_deploy_waiting_for_an_upload_fails_with_it_or_is_superseded(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    data = model[: 200 * KIB]
    chunk = 16 * KIB
    config = make_config(capped, tmp_path / "state")
    async with agent_and_observer(capped, config) as (_, obs):
        topics = obs.topics
        sha = await send_manifest(sender, topics, data, chunk)
        await until_status(obs, sha, "receiving")
        await obs.deploy(
            CAM1, "CAM_B", {"request_id": "w1", "nn_config": GENERIC, "model_sha256": sha}
        )
        await obs.wait_for(lambda: "transferring" in obs.states("w1"), what="transferring")
        # a later deploy for the same stream supersedes the one still waiting
        await obs.deploy(
            CAM1, "CAM_B", {"request_id": "w2", "nn_config": GENERIC, "model_sha256": sha}
        )
        superseded = await obs.outcome("w1")
        assert superseded.state == "superseded"
        assert superseded.superseded_by == "w2"
        await obs.wait_for(lambda: "transferring" in obs.states("w2"), what="transferring")
        # a corrupted model: the upload fails, and so does the deploy waiting for it
        corrupt = bytearray(data)
        corrupt[-1] ^= 0xFF
        for offset in chunks(len(data), chunk):
            await sender.publish(
                topics.chunk(sha, offset), bytes(corrupt[offset : offset + chunk]), qos=1
            )
        failed = await obs.outcome("w2")
        assert failed.state == "failed"
        assert failed.error is not None
        assert failed.error.code == "checksum_mismatch"
        assert obs.states("w2").count("accepted") == 1
        # nothing changed on the camera
        status = obs.latest_json(topics.nn_status(CAM1, "CAM_B"))
        assert status is None or status["state"] == "none"


async def test_a_corrupted_chunk_fails_the_upload_with_checksum_mismatch(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    data = model[: 20 * 4 * KIB + 100]
    chunk = 4 * KIB
    config = make_config(capped, tmp_path / "state")
    async with agent_and_observer(capped, config) as (_, obs):
        topics = obs.topics
        sha = await _start(sender, topics, data, chunk)
        await until_status(obs, sha, "receiving")
        # a corrupted chunk: the whole model's sha256 does not match
        corrupt = bytearray(data)
        corrupt[-1] ^= 0xFF
        for offset in chunks(len(data), chunk):
            await sender.publish(
                topics.chunk(sha, offset), bytes(corrupt[offset : offset + chunk]), qos=1
            )
        failed = await until_status(obs, sha, "failed")
        assert failed["error"]["code"] == "checksum_mismatch"
        assert failed["received"] == 0  # what it had is gone
        assert not list((tmp_path / "state" / "uploads").iterdir())
        assert not (tmp_path / "state" / "models" / f"{sha}.blob").exists()


async def test_upload_through_the_embedded_amqtt_broker(tmp_path: Path, model: bytes) -> None:
    """The demo's broker (amqtt, MQTT 3.1.1) carries an upload and its status too."""
    data = model[:300_000]
    chunk = 32 * KIB
    with run_broker("amqtt", tmp_path / "amqtt") as amqtt:
        config = make_config(amqtt, tmp_path / "state")
        async with (
            agent_and_observer(amqtt, config) as (_, obs),
            aiomqtt.Client(amqtt.host, amqtt.port, protocol=aiomqtt.ProtocolVersion.V311) as client,
        ):
            sha = await send_manifest(client, obs.topics, data, chunk)
            await until_status(obs, sha, "receiving")
            await send_chunks(client, obs.topics, data, chunk, chunks(len(data), chunk))
            await until_status(obs, sha, "stored")
            body = {"request_id": "amqtt", "nn_config": GENERIC, "model_sha256": sha}
            await obs.deploy(CAM1, "CAM_B", body)
            assert (await obs.outcome("amqtt")).state == "succeeded"


async def test_another_chunk_size_starts_the_upload_again_and_a_deploy_waits_on(
    capped: Broker, tmp_path: Path, model: bytes, sender: aiomqtt.Client
) -> None:
    data = model[: 300 * KIB + 7]
    config = make_config(capped, tmp_path / "state")
    async with agent_and_observer(capped, config) as (_, obs):
        topics = obs.topics
        sha = await send_manifest(sender, topics, data, 16 * KIB)
        await send_chunks(sender, topics, data, 16 * KIB, chunks(len(data), 16 * KIB)[:5])
        await until_status(obs, sha, "receiving", received=5 * 16 * KIB)
        body = {"request_id": "waits", "nn_config": GENERIC, "model_sha256": sha}
        await obs.deploy(CAM1, "CAM_B", body)
        await obs.wait_for(lambda: "transferring" in obs.states("waits"), what="transferring")
        # the sender comes back with another chunk_size: the upload starts from nothing
        await send_manifest(sender, topics, data, 64 * KIB)
        again = await until_status(obs, sha, "receiving", chunk_size=64 * KIB)
        assert (again["received"], again["missing"]) == (0, [[0, len(data)]])
        await send_chunks(sender, topics, data, 64 * KIB, chunks(len(data), 64 * KIB))
        await until_status(obs, sha, "stored")
        assert (await obs.outcome("waits")).state == "succeeded"
