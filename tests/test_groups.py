"""Group commands (`{prefix}/groups/{group}/nn/...`) against several agent processes."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.harness import CAM1, CAM2, YOLO, agent_and_observer, camera_spec, make_config, observe

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from agent.messages import Event
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

CAM3 = "1844301011D2DE0F00"
PREFIX = "oaktest"


def _group_topic(group: str, action: str) -> str:
    return Topics.for_agent(PREFIX, "any", (group,)).group_command(group, action)  # type: ignore[arg-type]


def _terminals(obs: Observer, request_id: str) -> dict[str, Event]:
    """The terminal event of each camera (\"\" for the agent as a whole) for `request_id`."""
    return {e.camera: e for e in obs.events(request_id) if e.terminal}


async def _outcomes(obs: Observer, request_id: str, cameras: set[str]) -> dict[str, Event]:
    def answered() -> dict[str, Event] | None:
        found = _terminals(obs, request_id)
        return found if set(found) >= cameras else None

    return await obs.wait_for(answered, what=f"{request_id} answered for {sorted(cameras)}")


def _online(obs: Observer, topics: Topics) -> bool:
    return obs.latest(topics.availability) == b"online"


@contextlib.asynccontextmanager
async def _fleet(
    broker: Broker, tmp_path: Path, agents: dict[str, dict[str, Any]]
) -> AsyncIterator[dict[str, Observer]]:
    """Agent processes (id -> write_config options), each watched by its own observer."""
    async with contextlib.AsyncExitStack() as stack:
        observers = {}
        for agent_id, options in agents.items():
            topics = Topics.for_agent(PREFIX, agent_id)
            observers[agent_id] = await stack.enter_async_context(observe(broker, topics))
            config = write_config(
                tmp_path / f"{agent_id}.toml", broker, tmp_path / agent_id, agent_id, **options
            )
            stack.enter_context(agent_process(config, tmp_path / f"{agent_id}.log"))
        for agent_id, obs in observers.items():
            topics = Topics.for_agent(PREFIX, agent_id)
            await obs.wait_for(partial(_online, obs, topics), what=f"{agent_id} online")
        yield observers


async def test_group_deploy_by_star_name_and_mxid_and_skipped(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    yolo = own_blobs["yolo_tiny"].read_bytes()
    tag = uuid.uuid4().hex[:8]
    site, entrance = f"site-{tag}", f"entrance-{tag}"
    ids = {name: f"g{name}-{tag}" for name in "abc"}
    agents: dict[str, dict[str, Any]] = {
        ids["a"]: {"groups": (site, entrance), "cameras": ((CAM1, "door"), (CAM2, "yard"))},
        ids["b"]: {"groups": (site,), "cameras": ((CAM1, "door"), (CAM3, "gate"))},
        ids["c"]: {"groups": (entrance,), "cameras": ((CAM2, "lot"),)},
    }
    async with _fleet(broker, tmp_path, agents) as obs:
        a, b, c = (obs[ids[n]] for n in "abc")
        info = await a.wait_for(lambda: a.latest_json(f"{PREFIX}/{ids['a']}/info"))
        assert info["groups"] == [site, entrance]

        # `*` on site: every camera of a and b with CAM_A; c is not in the group
        star = {
            "request_id": "all",
            "nn_config": YOLO,
            "model": yolo,
            "target": {"cameras": ["*"], "stream": "CAM_A"},
        }
        await a.send(_group_topic(site, "deploy"), msgspec.msgpack.encode(star))
        got_a = await _outcomes(a, "all", {CAM1, CAM2})
        got_b = await _outcomes(b, "all", {CAM1, CAM3})
        for event in [*got_a.values(), *got_b.values()]:
            assert event.state == "succeeded", event
            assert event.group == site
            assert event.stream == "CAM_A"
        assert set(got_a) == {CAM1, CAM2}
        assert set(got_b) == {CAM1, CAM3}
        for o, cams in ((a, (CAM1, CAM2)), (b, (CAM1, CAM3))):
            for cam in cams:  # one event stream per camera, no restart twice
                assert [e.state for e in o.events("all") if e.camera == cam] == [
                    "accepted",
                    "applying",
                    "succeeded",
                ]
                status = o.latest_json(o.topics.nn_status(cam, "CAM_A"))
                assert status["state"] == "running"
                assert status["request_id"] == "all"

        # by name on entrance: a's "door"; c has no camera named so and says so once
        by_name = {
            "request_id": "byname",
            "model_sha256": got_status_sha(a, CAM1),
            "nn_config": YOLO,
            "labels": ["x"],
            "target": {"cameras": ["door"], "stream": "CAM_A"},
        }
        await a.send(_group_topic(entrance, "deploy"), msgspec.json.encode(by_name))
        assert set(await _outcomes(a, "byname", {CAM1})) == {CAM1}
        skipped = await _outcomes(c, "byname", {""})
        assert skipped[""].state == "skipped"
        assert skipped[""].group == entrance
        assert skipped[""].error is None
        assert [e.state for e in c.events("byname")] == ["skipped"]

        # by mxid on site: b's CAM3 only; a says skipped
        delete = {"request_id": "bymxid", "target": {"cameras": [CAM3], "stream": "CAM_A"}}
        await a.send(_group_topic(site, "delete"), msgspec.json.encode(delete))
        assert (await _outcomes(b, "bymxid", {CAM3}))[CAM3].state == "succeeded"
        assert (await _outcomes(a, "bymxid", {""}))[""].state == "skipped"
        assert b.latest_json(b.topics.nn_status(CAM3, "CAM_A"))["state"] == "none"
        assert b.latest_json(b.topics.nn_status(CAM1, "CAM_A"))["state"] == "running"

        # the same group command again: each camera replays its record, nothing runs twice
        await a.send(_group_topic(site, "deploy"), msgspec.msgpack.encode(star))
        for o, cams in ((a, (CAM1, CAM2)), (b, (CAM1, CAM3))):
            await o.wait_for(partial(_replayed, o, "all", cams), what="replays")
            for cam in cams:
                states = [e.state for e in o.events("all") if e.camera == cam]
                assert states == ["accepted", "applying", "succeeded", "succeeded"], states
        # c heard none of the site's commands: it is answered only for its own group
        assert c.events("all") == []
        assert c.events("bymxid") == []


def _replayed(obs: Observer, request_id: str, cameras: tuple[str, ...]) -> bool:
    """Every camera answered `request_id` twice: once, and once more from its record."""
    return all(
        sum(e.terminal for e in obs.events(request_id) if e.camera == cam) == 2 for cam in cameras
    )


def got_status_sha(obs: Observer, camera: str) -> str:
    status = obs.latest_json(obs.topics.nn_status(camera, "CAM_A"))
    sha: str = status["model"]["sha256"]
    return sha


async def test_bad_group_commands_are_rejected_with_the_field(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    ssd = own_blobs["ssd_tiny"].read_bytes()
    group = f"g-{uuid.uuid4().hex[:8]}"
    agent_id = f"gbad-{uuid.uuid4().hex[:8]}"
    agents = {agent_id: {"groups": (group,), "cameras": ((CAM1, "door"), (CAM2, "yard"))}}
    async with _fleet(broker, tmp_path, agents) as obs:
        o = obs[agent_id]
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("t1", {"target": {"cameras": [], "stream": "CAM_A"}}, "$.target.cameras"),
            ("t2", {"target": {"cameras": ["*"], "stream": "CAM_Q"}}, "$.target.stream"),
            ("t3", {}, "target"),
            ("t4", {"target": {"cameras": ["*", "door"], "stream": "CAM_A"}}, "$.target.cameras"),
        ]
        for request_id, extra, _ in cases:
            body = {"request_id": request_id, "nn_config": {"type": "MobileNet"}, "model": ssd}
            await o.send(_group_topic(group, "deploy"), msgspec.msgpack.encode(body | extra))
        for request_id, _, where in cases:
            event = (await _outcomes(o, request_id, {""}))[""]
            assert event.state == "rejected"
            assert event.group == group
            assert event.error is not None
            assert event.error.code == "invalid_payload"
            assert where in event.error.message, event.error.message
        # a camera named explicitly but without the stream: rejected for that camera only
        body = {
            "request_id": "nostream",
            "nn_config": {"type": "MobileNet"},
            "model": ssd,
            "target": {"cameras": ["door", CAM2], "stream": "CAM_H"},
        }
        await o.send(_group_topic(group, "deploy"), msgspec.msgpack.encode(body))
        got = await _outcomes(o, "nostream", {CAM1, CAM2})
        assert {e.error.code for e in got.values() if e.error} == {"unknown_stream"}
        assert all(e.state == "rejected" for e in got.values())
        # the same request_id, fixed, runs now: a rejection is not recorded
        fixed = body | {"target": {"cameras": ["door"], "stream": "CAM_A"}}
        await o.send(_group_topic(group, "deploy"), msgspec.msgpack.encode(fixed))
        await o.wait_for(
            lambda: (
                [e.state for e in o.events("nostream") if e.camera == CAM1][-1:] == ["succeeded"]
            ),
            what="fixed deploy",
        )


async def test_retained_group_command_is_never_executed(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    ssd = own_blobs["ssd_tiny"].read_bytes()
    group = f"r-{uuid.uuid4().hex[:8]}"
    agent_id = f"gret-{uuid.uuid4().hex[:8]}"
    body = {
        "request_id": "kept",
        "nn_config": {"type": "MobileNet"},
        "model": ssd,
        "target": {"cameras": ["*"], "stream": "CAM_A"},
    }
    topic = _group_topic(group, "deploy")
    async with observe(broker, Topics.for_agent(PREFIX, agent_id)) as o:
        # on the broker before the agent subscribes
        await o.send(topic, msgspec.msgpack.encode(body), retain=True)
        agents = {agent_id: {"groups": (group,)}}
        try:
            async with _fleet(broker, tmp_path, agents) as obs:
                watcher = obs[agent_id]
                kept = (await _outcomes(watcher, "kept", {""}))[""]
                assert kept.state == "rejected"
                assert kept.error is not None
                assert kept.error.code == "retained_command"
                # published retained while the agent listens (MQTT 5 keeps the flag)
                if broker.mqtt5:
                    live = body | {"request_id": "live"}
                    await o.send(topic, msgspec.msgpack.encode(live), retain=True)
                    event = (await _outcomes(watcher, "live", {""}))[""]
                    assert event.error is not None
                    assert event.error.code == "retained_command"
                # a normal group command after them runs: the retained ones never did
                await o.send(topic, msgspec.msgpack.encode(body | {"request_id": "now"}))
                await _outcomes(watcher, "now", {CAM1, CAM2})
                for cam in (CAM1, CAM2):
                    assert "accepted" not in watcher.states("kept")
                    assert "accepted" not in watcher.states("live")
                    status = watcher.latest_json(watcher.topics.nn_status(cam, "CAM_A"))
                    assert status["request_id"] == "now"
        finally:
            await o.send(topic, b"", retain=True)  # clear it from the shared broker


async def test_group_command_keeps_each_cameras_order(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """A per-camera command, a group command, a per-camera command: taken in that order."""
    yolo = own_blobs["yolo_tiny"].read_bytes()
    ssd = own_blobs["ssd_tiny"].read_bytes()
    group = f"o-{uuid.uuid4().hex[:8]}"
    config = make_config(
        broker,
        tmp_path,
        cameras=(camera_spec(CAM1, boot_seconds=0.5), camera_spec(CAM2)),
        groups=(group,),
    )
    async with agent_and_observer(broker, config) as (_, obs):
        for round_ in range(3):
            first, middle, last = (f"{n}{round_}" for n in ("first", "group", "last"))
            await obs.deploy(CAM1, "CAM_A", {"request_id": first, "nn_config": YOLO, "model": yolo})
            grouped = {
                "request_id": middle,
                "nn_config": {"type": "MobileNet"},
                "model": ssd,
                "target": {"cameras": ["*"], "stream": "CAM_A"},
            }
            await obs.send(_group_topic(group, "deploy"), msgspec.msgpack.encode(grouped))
            await obs.delete(CAM1, "CAM_A", {"request_id": last})
            await obs.outcome(last)
            await _outcomes(obs, middle, {CAM1, CAM2})
            accepted = [
                e.request_id
                for e in obs.events()
                if e.camera == CAM1 and e.state == "accepted" and e.request_id.endswith(str(round_))
            ]
            assert accepted == [first, middle, last]
            assert obs.latest_json(obs.topics.nn_status(CAM1, "CAM_A"))["state"] == "none"
            assert obs.latest_json(obs.topics.nn_status(CAM2, "CAM_A"))["request_id"] == middle


async def test_a_group_command_interrupted_by_a_crash_is_answered_with_its_group(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """Killed mid-apply, the agent answers the group command `interrupted` after its
    restart; that answer names the group like the command's other events."""
    ssd = own_blobs["ssd_tiny"].read_bytes()
    group = f"k-{uuid.uuid4().hex[:8]}"
    agent_id = f"gkill-{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "agent.toml", broker, tmp_path / "state", agent_id, groups=(group,),
        boot_seconds=2.0,
    )  # fmt: skip
    body = {
        "request_id": "cut",
        "nn_config": {"type": "MobileNet"},
        "model": ssd,
        "target": {"cameras": [CAM1], "stream": "CAM_A"},
    }
    topics = Topics.for_agent(PREFIX, agent_id)
    async with observe(broker, topics) as obs:
        with agent_process(config, tmp_path / "agent.log") as first:
            await obs.wait_for(partial(_online, obs, topics), what="online")
            await obs.send(_group_topic(group, "deploy"), msgspec.msgpack.encode(body))
            await obs.wait_for(lambda: "applying" in obs.states("cut"), what="applying")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline", what="will")
        with agent_process(config, tmp_path / "agent.log"):
            cut = (await _outcomes(obs, "cut", {CAM1}))[CAM1]
            assert (cut.state, cut.error and cut.error.code) == ("failed", "interrupted")
            assert [e.group for e in obs.events("cut")] == [group] * len(obs.events("cut"))
            # and the camera converges to the accepted set, as for any command
            await obs.wait_for(
                lambda: (
                    (obs.latest_json(topics.nn_status(CAM1, "CAM_A")) or {}).get("state")
                    == "running"
                ),
                what="converged",
            )
