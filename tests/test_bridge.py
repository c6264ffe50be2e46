"""A site mosquitto bridged to a central one: agents on the site, the fleet controller on the
central broker; a bridge outage in the middle of a rollout."""

from __future__ import annotations

import json
import uuid
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from agent.fleet.bridge import bridge_topics
from agent.topics import Topics
from tests.bridge import cut_link
from tests.harness import CAM1, CAM2, observe
from tests.test_fleet import (
    PREFIX,
    _record,
    _until_succeeded,
    controller_config,
    deploy_args,
    fleet_command,
    fleet_of,
    run_fleet,
)

if TYPE_CHECKING:
    from tests.brokers import Broker

pytestmark = pytest.mark.anyio


@pytest.fixture
def needs_mosquitto(broker: Broker) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("bridges need mosquitto")


@pytest.mark.usefixtures("needs_mosquitto")
async def test_rollout_through_a_bridge(tmp_path: Path, own_blobs: dict[str, Path]) -> None:
    group = f"bridge-{uuid.uuid4().hex[:8]}"
    rollout_id = f"br-{uuid.uuid4().hex[:8]}"
    async with cut_link(tmp_path / "brokers", PREFIX) as (central, site, _):
        config = controller_config(tmp_path / "controller.toml", central)
        async with fleet_of(site, tmp_path, group, 2) as agents:
            # the agents' retained info and status are on the central broker too
            for agent_id in agents:
                topics = Topics.for_agent(PREFIX, agent_id)
                async with observe(central, topics) as far:
                    info = await far.wait_for(partial(far.latest_json, topics.info))
                    assert info["groups"] == [group]
                    status = partial(far.latest, topics.camera_status(CAM2))
                    await far.wait_for(status, what="status across the bridge")
            report = tmp_path / "report.json"
            more = ("--max-parallel", "2", "--report", str(report))
            done = await run_fleet(
                config, *deploy_args(group, own_blobs["ssd_tiny"], rollout_id, *more)
            )
            assert done.returncode == 0, done.stderr.decode()
            assert json.loads(report.read_text())["counts"] == {"succeeded": 4}
            for obs in agents.values():
                for camera in (CAM1, CAM2):
                    status = obs.latest_json(obs.topics.nn_status(camera, "CAM_A"))
                    assert status["request_id"] == rollout_id


@pytest.mark.usefixtures("needs_mosquitto")
async def test_bridge_outage_mid_rollout_then_resume(
    tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    group = f"bridge-{uuid.uuid4().hex[:8]}"
    rollout_id = f"bo-{uuid.uuid4().hex[:8]}"
    blob = own_blobs["ssd_tiny"]
    async with cut_link(tmp_path / "brokers", PREFIX) as (central, site, link):
        config = controller_config(tmp_path / "controller.toml", central)
        async with (
            fleet_of(site, tmp_path, group, 2, boot_seconds=1.0) as agents,
            observe(central, Topics(f"{PREFIX}/rollouts/{rollout_id}")) as records,
        ):
            report = tmp_path / "report.json"
            more = ("--max-parallel", "1", "--timeout", "4", "--report", str(report))
            command = fleet_command(config, *deploy_args(group, blob, rollout_id, *more))
            async with await anyio.open_process(command) as process:
                await _until_succeeded(records, rollout_id, 1)
                link.cut()
                with anyio.fail_after(60):
                    code = await process.wait()
            assert code == 3  # incomplete: outcomes unknown
            document = json.loads(report.read_text())
            rollout = document["rollout"]
            assert rollout["state"] == "incomplete"
            assert "resume" in rollout["reason"]
            states = [t["state"] for t in rollout["targets"]]
            assert states.count("unknown") == 1, states
            assert set(states) <= {"succeeded", "unknown", "pending"}
            # what it says succeeded did: the agent says so too, on its own broker
            for target in rollout["targets"]:
                obs = agents[target["agent"]]
                ran = [e.state for e in obs.events(rollout_id) if e.camera == target["camera"]]
                if target["state"] == "succeeded":
                    assert ran[-1] == "succeeded"
            link.restore()
            resumed = await run_fleet(
                config, "deploy", "--resume", rollout_id, "--model", str(blob)
            )
            assert resumed.returncode == 0, resumed.stderr.decode()
            final = _record(records, rollout_id)
            assert final is not None
            assert [t.state for t in final.targets] == ["succeeded"] * 4
            for obs in agents.values():
                for camera in (CAM1, CAM2):
                    # each ran it once, whether the command crossed before the cut or after
                    assert obs.latest_json(obs.topics.camera_status(camera))["restarts"] == 1
            assert link.connections >= 2  # the bridge came back through the link


def test_the_readme_bridge_lines_are_the_ones_tested() -> None:
    """The README's site bridge block names exactly the topics the tests and the demo use."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Bridging a site broker to a central one", 1)[1]
    block = section.split("```", 2)[1]
    lines = tuple(line for line in block.splitlines() if line.startswith("topic "))
    assert lines == bridge_topics("oak")
