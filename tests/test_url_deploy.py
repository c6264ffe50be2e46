"""Deploys with `model_url`: downloaded (resumed, retried), checked, stored, applied."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.config import DownloadSettings
from agent.topics import Topics
from tests.harness import CAM1, CAM2, agent_and_observer, make_config
from tests.httpserver import file_server
from tests.uploader import padded_model

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config import Config
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

GENERIC = {"type": "Generic"}
SIZE = 1_500_000
SECRET = "s3cr3t-token"  # noqa: S105  # a made-up credential that must never be echoed


@pytest.fixture(scope="module")
def model(wheel_blobs: dict[str, Path]) -> bytes:
    return padded_model(wheel_blobs["Laserscan_10_1_shaves1"], SIZE, seed=23)


def _config(broker: Broker, state: Path, **download: Any) -> Config:
    config = make_config(broker, state)
    settings = DownloadSettings(**{"timeout": 30.0, **download})
    return msgspec.structs.replace(config, download=settings)


def _deploy(request_id: str, url: str, data: bytes, **extra: Any) -> dict[str, Any]:
    sha = hashlib.sha256(data).hexdigest()
    return {
        "request_id": request_id,
        "nn_config": GENERIC,
        "model_url": url,
        "model_sha256": sha,
        **extra,
    }


def _everything_said(obs: Observer) -> str:
    """What the agent published (the commands sent to it hold the URL, of course)."""
    said = [m for m in obs.messages if not m.topic.endswith(("/nn/deploy", "/nn/delete"))]
    assert said
    return "\n".join(m.payload.decode(errors="replace") for m in said)


async def test_url_deploy_resumes_and_succeeds_without_showing_credentials(
    broker: Broker, tmp_path: Path, model: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    config = _config(broker, tmp_path / "state")
    # the connection drops twice mid-body: the download resumes with Range each time
    with file_server(model, plan=[("drop", 400_000), ("drop", 300_000)]) as files:
        url = files.url.replace("http://", f"http://user:{SECRET}@") + f"?sig={SECRET}"
        async with agent_and_observer(broker, config) as (app, obs):
            await obs.deploy(CAM1, "CAM_B", _deploy("u1", url, model, model_size=SIZE))
            done = await obs.outcome("u1")
            assert done.state == "succeeded", done
            states = obs.states("u1")
            assert states[0] == "accepted"
            assert states[-2:] == ["applying", "succeeded"]
            assert set(states[1:-2]) == {"transferring"}
            progress = [e.progress for e in obs.events("u1") if e.progress is not None]
            assert progress[-1] is not None
            assert (progress[-1].received, progress[-1].total) == (SIZE, SIZE)
            assert len(progress) <= 12
            sha = hashlib.sha256(model).hexdigest()
            assert app.coordinator.workers[CAM1].running["CAM_B"].model.sha256 == sha
            # a second deploy of the same model comes from the store: no download
            requests = len(files.requests)
            await obs.deploy(CAM2, "CAM_B", _deploy("u2", url, model))
            assert (await obs.outcome("u2")).state == "succeeded"
            assert obs.states("u2") == ["accepted", "applying", "succeeded"]
            assert len(files.requests) == requests
            said = _everything_said(obs)
        ranges = [r.headers.get("range") for r in files.requests]
        print(f"url deploy: requests={len(files.requests)} ranges={ranges} served={files.served}")
        assert files.served < 2 * SIZE
        assert ranges[0] is None
        assert all(r is not None for r in ranges[1:])
    logs = capfd.readouterr()
    assert SECRET not in said
    assert SECRET not in logs.out + logs.err
    assert "download started" in logs.out + logs.err


async def test_url_deploy_failures(broker: Broker, tmp_path: Path, model: bytes) -> None:
    config = _config(broker, tmp_path / "state", max_model_bytes=SIZE)
    wrong = bytearray(model)
    wrong[-1] ^= 1
    async with agent_and_observer(broker, config) as (_, obs):
        with file_server(model, always_status=404) as files:
            await obs.deploy(CAM1, "CAM_A", _deploy("gone", files.url, model))
            gone = await obs.outcome("gone")
        assert gone.state == "failed"
        assert gone.error is not None
        assert gone.error.code == "download_failed"
        assert "404" in gone.error.message
        assert obs.states("gone")[0] == "accepted"

        with file_server(bytes(wrong)) as files:
            await obs.deploy(CAM1, "CAM_A", _deploy("wrong", files.url, model))
            mismatch = await obs.outcome("wrong")
        assert mismatch.error is not None
        assert mismatch.error.code == "checksum_mismatch"
        assert not list((tmp_path / "state" / "downloads").glob("*.part"))

        # refused before anything is fetched
        for body, code, where in [
            (
                _deploy("big", "http://127.0.0.1:9/m", model, model_size=SIZE + 1),
                "payload_too_large",
                "",
            ),
            (_deploy("ftp", "ftp://127.0.0.1/m", model), "invalid_payload", "$.model_url"),
            (
                {**_deploy("nosha", "http://127.0.0.1:9/m", model), "model_sha256": None},
                "invalid_payload",
                "$.model_sha256",
            ),
        ]:
            await obs.deploy(CAM1, "CAM_A", body)
            refused = await obs.outcome(body["request_id"])
            assert refused.state == "rejected"
            assert refused.error is not None
            assert refused.error.code == code
            assert where in refused.error.message
        status = obs.latest_json(obs.topics.nn_status(CAM1, "CAM_A"))
        assert status is None or status["state"] == "none"


async def test_deploys_of_one_model_at_once_share_one_download(
    broker: Broker, tmp_path: Path, model: bytes
) -> None:
    config = _config(broker, tmp_path / "state")
    with file_server(model, plan=[("stall", 2.0)]) as files:
        async with agent_and_observer(broker, config) as (_, obs):
            await obs.deploy(CAM1, "CAM_B", _deploy("a", files.url, model))
            await obs.deploy(CAM2, "CAM_B", _deploy("b", files.url, model))
            # named by sha256 alone while it downloads: it waits for that download too
            await obs.wait_for(lambda: "transferring" in obs.states("a"), what="downloading")
            by_sha = {k: v for k, v in _deploy("c", files.url, model).items() if k != "model_url"}
            await obs.deploy(CAM1, "CAM_C", by_sha)
            for request_id in ("a", "b", "c"):
                assert (await obs.outcome(request_id)).state == "succeeded"
                assert "transferring" in obs.states(request_id)
        assert len(files.requests) == 1
        assert files.served == SIZE


async def test_group_deploy_by_url_downloads_once_for_every_camera(
    broker: Broker, tmp_path: Path, model: bytes
) -> None:
    """A group deploy with `model_url`: each selected camera's request goes `transferring`
    (it does not fail with model_not_found), they share one download, and both apply it."""
    group = "yard"
    config = _config(broker, tmp_path / "state")
    config = msgspec.structs.replace(
        config, agent=msgspec.structs.replace(config.agent, groups=(group,))
    )
    topic = Topics.for_agent("oaktest", "any", (group,)).group_command(group, "deploy")
    with file_server(model, plan=[("stall", 1.0)]) as files:
        async with agent_and_observer(broker, config) as (app, obs):
            command = {
                **_deploy("g1", files.url, model),
                "target": {"cameras": ["*"], "stream": "CAM_B"},
            }
            await obs.send(topic, msgspec.json.encode(command))

            def finals() -> dict[str, str] | None:
                found: dict[str, str] = {e.camera: e.state for e in obs.events("g1") if e.terminal}
                return found if set(found) >= {CAM1, CAM2} else None

            assert await obs.wait_for(finals, what="g1 answered for both cameras") == {
                CAM1: "succeeded",
                CAM2: "succeeded",
            }
            for camera in (CAM1, CAM2):
                states = [e.state for e in obs.events("g1") if e.camera == camera]
                assert states[0] == "accepted", states
                assert "transferring" in states, states
                assert states[-2:] == ["applying", "succeeded"], states
                assert all(e.group == group for e in obs.events("g1") if e.camera == camera)
            sha = hashlib.sha256(model).hexdigest()
            for camera in (CAM1, CAM2):
                assert app.coordinator.workers[camera].running["CAM_B"].model.sha256 == sha
        assert len(files.requests) == 1
        assert files.served == SIZE
