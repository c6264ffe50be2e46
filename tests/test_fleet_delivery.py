"""How `oak-agent fleet deploy` gets the model to the agents: a chunked upload to each agent
that lacks it (through capped brokers and bridges), a URL each agent downloads, or a sha256
every agent stores already."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING

import pytest

from tests.bridge import bridged
from tests.brokers import BrokerUnavailable, mosquitto_path, run_broker
from tests.harness import CAM1, CAM2
from tests.httpserver import file_server
from tests.test_fleet import PREFIX, controller_config, deploy_args, fleet_of, run_fleet
from tests.uploader import padded_model

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

CAP = 131072  # the capped brokers' max_packet_size
MODEL_SIZE = 1_500_000  # far above the cap: it crosses only in chunks
GENERIC = '{"type": "Generic"}'


@pytest.fixture(scope="module")
def big_model(wheel_blobs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real third-party blob padded to 1.5 MB, as a file."""
    path = tmp_path_factory.mktemp("model") / "big.blob"
    path.write_bytes(padded_model(wheel_blobs["Laserscan_10_1_shaves1"], MODEL_SIZE, seed=5))
    return path


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto that disconnects any client sending a packet above 128 KiB."""
    if mosquitto_path() is None:
        pytest.skip("needs mosquitto (max_packet_size)")
    settings = ("allow_anonymous true", f"max_packet_size {CAP}")
    try:
        with run_broker("mosquitto", tmp_path / "capped", settings=settings) as broker:
            yield broker
    except BrokerUnavailable as exc:
        pytest.fail(f"cannot start mosquitto: {exc}")


def _deploy(group: str, model: Path, rollout_id: str, *more: str) -> list[str]:
    return deploy_args(group, model, rollout_id, "--timeout", "30", *more, nn_config=GENERIC)


def _content(path: Path) -> bytes:
    return path.read_bytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(_content(path)).hexdigest()


def _runs(obs: Observer, camera: str) -> str | None:
    status = obs.latest_json(obs.topics.nn_status(camera, "CAM_A"))
    return None if status is None or status["model"] is None else status["model"]["sha256"]


def _stored(obs: Observer) -> set[str]:
    return {entry["sha256"] for entry in obs.latest_json(obs.topics.models) or []}


def _entry(obs: Observer, sha: str) -> dict[str, list[str]] | None:
    """Who runs, and who ran before, the model `sha` as the agent's latest list says."""
    for entry in obs.latest_json(obs.topics.models) or []:
        if entry["sha256"] == sha:
            return {key: entry[key] for key in ("in_use_by", "previous_for")}
    return None


async def test_rollout_uploads_in_chunks_through_a_capped_broker(
    capped: Broker, tmp_path: Path, big_model: Path
) -> None:
    """MQTT 5: the controller reads the broker's Maximum Packet Size from its CONNACK."""
    group = f"up-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", capped)
    sha = _sha(big_model)
    async with fleet_of(capped, tmp_path, group, 2) as agents:
        report = tmp_path / "report.json"
        first = f"u1-{uuid.uuid4().hex[:6]}"
        done = await run_fleet(config, *_deploy(group, big_model, first, "--report", str(report)))
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        rollout = json.loads(report.read_text())["rollout"]
        assert sorted(rollout["uploaded"]) == sorted(agents)  # once per agent, not per camera
        assert "uploading" in done.stdout.decode()  # each camera showed it, then went on
        for obs in agents.values():
            assert sha in _stored(obs)
            assert [_runs(obs, CAM1), _runs(obs, CAM2)] == [sha, sha]
            # the model went in chunks under the cap: a command carrying it would not fit
            chunks = [m for m in obs.messages if f"/models/{sha}/chunks/" in m.topic]
            assert len(chunks) >= MODEL_SIZE // CAP
            assert max(len(m.payload) for m in chunks) < CAP
        # delete it, deploy it again: the agents store it still, nothing is uploaded
        deleted = await run_fleet(
            config, "delete", "--group", group, "--stream", "CAM_A", "--report", str(report)
        )
        assert deleted.returncode == 0, deleted.stderr.decode()
        second = f"u2-{uuid.uuid4().hex[:6]}"
        again = await run_fleet(config, *_deploy(group, big_model, second, "--report", str(report)))
        assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
        assert json.loads(report.read_text())["rollout"]["uploaded"] == []
        assert "uploading" not in again.stdout.decode()
        for obs in agents.values():
            assert [_runs(obs, CAM1), _runs(obs, CAM2)] == [sha, sha]


async def test_a_311_controller_needs_max_packet_then_resumes(
    capped: Broker, tmp_path: Path, big_model: Path
) -> None:
    """MQTT 3.1.1 names no packet limit: without --max-packet the broker drops the upload's
    connection at the first chunk, the cameras end `unknown`; a resume with it finishes."""
    group = f"up-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "controller.toml"
    config.write_text(
        f'[mqtt]\nhost = "{capped.host}"\nport = {capped.port}\nprefix = "{PREFIX}"\n'
        'protocol = "3.1.1"\n'
    )
    rollout_id = f"u3-{uuid.uuid4().hex[:6]}"
    report = tmp_path / "report.json"
    async with fleet_of(capped, tmp_path, group, 1) as agents:
        (obs,) = agents.values()
        cut = await run_fleet(
            config, *_deploy(group, big_model, rollout_id, "--report", str(report))
        )
        assert cut.returncode == 3, cut.stdout.decode() + cut.stderr.decode()  # incomplete
        rollout = json.loads(report.read_text())["rollout"]
        assert rollout["reason"].startswith("the model did not reach the agent of 2 camera(s)")
        targets = rollout["targets"]
        assert [t["state"] for t in targets] == ["unknown", "unknown"]
        assert {t["error"]["code"] for t in targets} == {"upload_unanswered"}
        assert "give --max-packet" in targets[0]["error"]["message"]
        assert b"ERROR" not in cut.stderr  # paho's own log of the drop is not shown
        assert _runs(obs, CAM1) is None  # nothing was deployed
        resumed = await run_fleet(
            config,
            "deploy",
            "--resume",
            rollout_id,
            "--model",
            str(big_model),
            "--max-packet",
            str(CAP),
            "--report",
            str(report),
        )
        assert resumed.returncode == 0, resumed.stdout.decode() + resumed.stderr.decode()
        assert json.loads(report.read_text())["counts"] == {"succeeded": 2}
        assert [_runs(obs, CAM1), _runs(obs, CAM2)] == [_sha(big_model)] * 2


async def test_rollout_through_a_bridge_to_a_capped_site(
    broker: Broker, tmp_path: Path, big_model: Path
) -> None:
    """The controller on an uncapped central broker, the agents on a capped site broker:
    `--max-packet` names the site's cap; the upload crosses the bridge in chunks."""
    if broker.kind != "mosquitto":
        pytest.skip("bridges need mosquitto")
    group = f"up-{uuid.uuid4().hex[:8]}"
    rollout_id = f"ub-{uuid.uuid4().hex[:6]}"
    report = tmp_path / "report.json"
    with bridged(tmp_path / "brokers", PREFIX, site=(f"max_packet_size {CAP}",)) as (
        central,
        site,
    ):
        config = controller_config(tmp_path / "controller.toml", central)
        async with fleet_of(site, tmp_path, group, 2) as agents:
            more = ("--max-packet", str(CAP), "--max-parallel", "4", "--report", str(report))
            done = await run_fleet(config, *_deploy(group, big_model, rollout_id, *more))
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
            assert sorted(json.loads(report.read_text())["rollout"]["uploaded"]) == sorted(agents)
            for obs in agents.values():
                assert [_runs(obs, CAM1), _runs(obs, CAM2)] == [_sha(big_model)] * 2


async def test_rollout_by_url_and_by_a_stored_sha256(
    broker: Broker, tmp_path: Path, big_model: Path
) -> None:
    """--model-url: every agent downloads it itself; --model-sha256 alone: refused up front
    when an agent does not store it, then accepted once they all do."""
    group = f"url-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    data = _content(big_model)
    sha = hashlib.sha256(data).hexdigest()
    report = tmp_path / "report.json"
    async with fleet_of(broker, tmp_path, group, 2) as agents:
        by_sha = ("--model-sha256", sha, "--nn-config", GENERIC)
        pick = ("deploy", "--group", group, "--stream", "CAM_B", "--timeout", "30")
        refused = await run_fleet(config, *pick, *by_sha)
        assert refused.returncode == 2
        for agent_id in agents:
            assert agent_id.encode() in refused.stderr
        assert b"--model FILE" in refused.stderr
        with file_server(data) as server:
            url = f"http://127.0.0.1:{server.port}/models/big.blob"
            by_url = await run_fleet(
                config,
                "deploy",
                "--group",
                group,
                "--stream",
                "CAM_A",
                "--model-url",
                url,
                "--model-sha256",
                sha,
                "--model-size",
                str(len(data)),
                "--nn-config",
                GENERIC,
                "--report",
                str(report),
            )
            assert by_url.returncode == 0, by_url.stdout.decode() + by_url.stderr.decode()
            assert len(server.requests) >= len(agents)  # each agent fetched it
        rollout = json.loads(report.read_text())["rollout"]
        assert rollout["uploaded"] == []
        assert rollout["spec"]["model_url"] == url
        for obs in agents.values():
            assert [_runs(obs, CAM1), _runs(obs, CAM2)] == [sha, sha]
            assert not [m for m in obs.messages if "/chunks/" in m.topic]
        # now every agent stores it: the sha256 alone is enough
        stored = await run_fleet(config, *pick, *by_sha, "--report", str(report))
        assert stored.returncode == 0, stored.stdout.decode() + stored.stderr.decode()
        assert json.loads(report.read_text())["counts"] == {"succeeded": 4}
        for obs in agents.values():
            for camera in (CAM1, CAM2):
                status = obs.latest_json(obs.topics.nn_status(camera, "CAM_B"))
                assert status["model"]["sha256"] == sha


async def test_a_model_the_agent_lost_is_uploaded_again(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """The agent's retained list still names the model, but its file is gone (cleaned up by
    hand): the deploy is refused `model_not_found`, the controller uploads it and sends the
    command again."""
    group = f"lost-{uuid.uuid4().hex[:8]}"
    config = controller_config(tmp_path / "controller.toml", broker)
    blob = own_blobs["ssd_tiny"]
    sha = _sha(blob)
    report = tmp_path / "report.json"
    async with fleet_of(broker, tmp_path, group, 1) as agents:
        ((agent_id, obs),) = agents.items()
        first = await run_fleet(config, *_deploy(group, blob, f"l1-{uuid.uuid4().hex[:6]}"))
        assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
        deleted = await run_fleet(config, "delete", "--group", group, "--stream", "CAM_A")
        assert deleted.returncode == 0, deleted.stderr.decode()
        # the list as it stays: no camera runs the model, both ran it before (it is kept);
        # removed only then, so that no later publication of the list drops it
        both = [f"{CAM1}/CAM_A", f"{CAM2}/CAM_A"]
        await obs.wait_for(
            lambda: _entry(obs, sha) == {"in_use_by": [], "previous_for": both},
            what="the list after the delete",
        )
        _remove(tmp_path / agent_id / "models" / f"{sha}.blob")
        rollout_id = f"l2-{uuid.uuid4().hex[:6]}"
        again = await run_fleet(config, *_deploy(group, blob, rollout_id, "--report", str(report)))
        assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
        assert json.loads(report.read_text())["rollout"]["uploaded"] == [agent_id]
        refused = [e for e in obs.events(rollout_id) if e.state == "rejected"]
        assert refused, "the first command named a model the agent no longer had"
        assert {e.error.code for e in refused if e.error} == {"model_not_found"}
        assert [_runs(obs, CAM1), _runs(obs, CAM2)] == [sha, sha]


def _remove(path: Path) -> None:
    path.unlink()
