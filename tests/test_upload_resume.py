"""Chunked uploads resume: after the sender stops, the agent is SIGKILLed, the broker restarts.

Each scenario prints how many chunks went out in all and how many were sent again, and
asserts that a sender reading `.../status` sends only the `missing` ranges to finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import uuid
from typing import TYPE_CHECKING, Any

import aiomqtt
import pytest

from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import mosquitto_path, run_broker
from tests.harness import CAM1, agent_and_observer, make_config, observe, running_agent
from tests.uploader import KIB, chunks, padded_model, send_chunks, send_manifest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

CHUNK = 96 * KIB
SIZE = 3_000_000
CAPPED = ("allow_anonymous true", "max_packet_size 131072")
GENERIC = {"type": "Generic"}


@pytest.fixture(scope="module")
def model(wheel_blobs: dict[str, Path]) -> bytes:
    return padded_model(wheel_blobs["Laserscan_10_1_shaves1"], SIZE, seed=11)


@contextlib.asynccontextmanager
async def _sender(broker: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"sender-{uuid.uuid4().hex[:8]}"
    ) as client:
        yield client


def _status(obs: Observer, sha256: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = obs.latest_json(obs.topics.upload_status(sha256)) or None
    return found


async def _until(obs: Observer, sha256: str, test: Any, what: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        current = _status(obs, sha256)
        return current if current is not None and test(current) else None

    return await obs.wait_for(found, what=what)


def _missing_offsets(status: dict[str, Any]) -> list[int]:
    assert not status.get("missing_truncated")
    return chunks(status["size"], status["chunk_size"], [tuple(r) for r in status["missing"]])


async def _finish(obs: Observer, sender: aiomqtt.Client, model: bytes, sha256: str) -> int:
    """Resume as a controller does: manifest again, read the status, send what is missing."""
    before = len(obs.on(obs.topics.upload_status(sha256)))
    await send_manifest(sender, obs.topics, model, CHUNK)
    status = await _until(
        obs,
        sha256,
        lambda s: len(obs.on(obs.topics.upload_status(sha256))) > before,
        "status after the manifest",
    )
    assert status["state"] == "receiving"
    offsets = _missing_offsets(status)
    await send_chunks(sender, obs.topics, model, CHUNK, offsets)
    stored = await _until(obs, sha256, lambda s: s["state"] != "receiving", "stored")
    assert stored["state"] == "stored", stored
    return len(offsets)


async def test_resume_after_the_sender_stops_halfway(
    tmp_path: Path, model: bytes, broker: Broker
) -> None:
    total = len(chunks(SIZE, CHUNK))
    config = make_config(broker, tmp_path / "state")
    async with agent_and_observer(broker, config) as (_, obs):
        async with _sender(broker) as first:
            sha = await send_manifest(first, obs.topics, model, CHUNK)
            # every other chunk of the first half, then the sender goes away
            await send_chunks(
                first, obs.topics, model, CHUNK, chunks(SIZE, CHUNK)[: total // 2 : 2]
            )
            half = await _until(obs, sha, lambda s: s["received"] > 0, "some received")
        await _until(obs, sha, lambda s: s["received"] == (total // 4 + 1) * CHUNK, "all durable")
        status = _status(obs, sha)
        assert status is not None
        missing = _missing_offsets(status)
        assert len(missing) == total - (total // 4 + 1)
        assert half["state"] == "receiving"
        async with _sender(broker) as second:
            resent = await _finish(obs, second, model, sha)
        print(f"sender stopped halfway: chunks={total} re-sent={resent} (only the missing ones)")
        assert resent == len(missing)
        body = {"request_id": "resumed", "nn_config": GENERIC, "model_sha256": sha}
        await obs.deploy(CAM1, "CAM_B", body)
        assert (await obs.outcome("resumed")).state == "succeeded"


async def test_resume_after_the_agent_is_killed_halfway(
    tmp_path: Path, model: bytes, broker: Broker
) -> None:
    total = len(chunks(SIZE, CHUNK))
    config_path = tmp_path / "agent.toml"
    agent_id = f"upkill-{os.getpid()}-{tmp_path.name[-6:]}"
    write_config(config_path, broker, tmp_path / "state", agent_id)
    topics = Topics.for_agent("oaktest", agent_id)
    sha = hashlib.sha256(model).hexdigest()
    async with observe(broker, topics) as obs, _sender(broker) as sender:
        with agent_process(config_path, tmp_path / "agent.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await send_manifest(sender, topics, model, CHUNK)
            await send_chunks(sender, topics, model, CHUNK, chunks(SIZE, CHUNK)[: total // 2])
            before = await _until(obs, sha, lambda s: s["received"] > 0, "some received")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        partial = tmp_path / "state" / "uploads" / f"{sha}.part"
        assert partial.exists()
        # what a power cut can leave at the journal's end: a torn record and zeroed blocks
        journal = partial.with_suffix(".chunks")
        with journal.open("ab") as f:
            f.write(b"\x07\x00\x00" + bytes(16))
        with agent_process(config_path, tmp_path / "agent.log") as second:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            resent = await _finish(obs, sender, model, sha)
            resumed = second.logged("upload resumed")
            assert resumed
            assert resumed[0]["received"] >= before["received"]  # what it said was on disk
            assert second.logged("upload journal cut at a torn record")
        print(
            f"agent SIGKILLed halfway: chunks={total} durable before the kill="
            f"{resumed[0]['received'] // CHUNK} re-sent={resent}"
        )
        assert resent <= total - before["received"] // CHUNK
        assert (tmp_path / "state" / "models" / f"{sha}.blob").read_bytes() == model


async def test_resume_after_the_broker_restarts_halfway(tmp_path: Path, model: bytes) -> None:
    if mosquitto_path() is None:
        pytest.skip("restarts a mosquitto of its own")
    total = len(chunks(SIZE, CHUNK))
    workdir = tmp_path / "broker"
    with contextlib.ExitStack() as first_broker:
        first = first_broker.enter_context(
            run_broker("mosquitto", workdir, persistence=True, settings=CAPPED)
        )
        config = make_config(first, tmp_path / "state")
        async with running_agent(config) as app:
            topics = app.topics
            sha = hashlib.sha256(model).hexdigest()
            async with observe(first, topics) as obs, _sender(first) as sender:
                await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
                await send_manifest(sender, topics, model, CHUNK)
                await send_chunks(sender, topics, model, CHUNK, chunks(SIZE, CHUNK)[: total // 2])
                await _until(obs, sha, lambda s: s["received"] > 0, "some received")
            connects = app.link.stats.connects
            first_broker.close()  # graceful: it keeps the sessions
            with run_broker(
                "mosquitto", workdir, port=first.port, persistence=True, settings=CAPPED
            ) as second:
                async with observe(second, topics) as obs, _sender(second) as sender:
                    await obs.wait_for(lambda: app.link.stats.connects > connects)
                    resent = await _finish(obs, sender, model, sha)
        print(f"broker restarted halfway: chunks={total} re-sent={resent}")
        assert resent <= total - total // 2


async def test_a_deploy_transferring_when_the_agent_is_killed_ends_once(
    tmp_path: Path, model: bytes, broker: Broker
) -> None:
    """Accepted and waiting for its upload when the agent dies: answered `interrupted` after
    the restart, exactly once; the upload itself resumes, and the camera is not touched."""
    total = len(chunks(SIZE, CHUNK))
    config_path = tmp_path / "agent.toml"
    agent_id = f"trkill-{os.getpid()}-{tmp_path.name[-6:]}"
    write_config(config_path, broker, tmp_path / "state", agent_id)
    topics = Topics.for_agent("oaktest", agent_id)
    sha = hashlib.sha256(model).hexdigest()
    async with observe(broker, topics) as obs, _sender(broker) as sender:
        with agent_process(config_path, tmp_path / "agent.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await send_manifest(sender, topics, model, CHUNK)
            await send_chunks(sender, topics, model, CHUNK, chunks(SIZE, CHUNK)[: total // 3])
            await _until(obs, sha, lambda s: s["received"] > 0, "some received")
            body = {"request_id": "cut", "nn_config": GENERIC, "model_sha256": sha}
            await obs.deploy(CAM1, "CAM_B", body)
            await obs.wait_for(lambda: "transferring" in obs.states("cut"), what="transferring")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        with agent_process(config_path, tmp_path / "agent.log"):
            cut = await obs.outcome("cut")
            assert cut.state == "failed"
            assert cut.error is not None
            assert cut.error.code == "interrupted"
            await _finish(obs, sender, model, sha)
            # repeated, the id is answered from the record, not run again
            await obs.deploy(CAM1, "CAM_B", body)
            await obs.wait_for(
                lambda: len([e for e in obs.events("cut") if e.terminal]) == 2, what="replay"
            )
            again = {"request_id": "again", "nn_config": GENERIC, "model_sha256": sha}
            await obs.deploy(CAM1, "CAM_B", again)
            assert (await obs.outcome("again")).state == "succeeded"
        terminals = [e for e in obs.events("cut") if e.terminal]
        assert terminals[0] == terminals[1]  # the replay is the recorded answer
        assert obs.states("cut").count("accepted") == 1
        assert "applying" not in obs.states("cut")
