"""Shaped outputs and health stats end to end: the real agent, a real broker, the simulator
driven by its objects knob (`{base}/simulator/cameras/{mxid}/objects`)."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import anyio
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import SecurityKey, SecuritySection
from agent.messages import ObjectSchedule, OutputOptions
from agent.signing import envelope, public_key_text, sign
from tests.harness import CAM1, CAM2, WAIT, agent_and_observer, camera_spec, make_config

if TYPE_CHECKING:
    from agent.config import Config
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

LABELS = ["background", "person", "car"]
MOBILENET = {"type": "MobileNet"}  # confidence threshold 0.5
FPS = 20.0


# --- the published shapes, as a consumer (the HA helper, a dashboard) decodes them -------------


class Counts(msgspec.Struct):
    total: int
    by_label: dict[str, int]
    present: list[str]
    ts: float
    seq: int


class Memory(msgspec.Struct):
    used: int | None
    total: int | None
    percent: float | None


class Temperature(msgspec.Struct):
    average: float | None
    css: float | None
    mss: float | None
    upa: float | None
    dss: float | None


class MemoryGroups(msgspec.Struct):
    ddr: Memory
    cmx: Memory
    leon_css_heap: Memory
    leon_mss_heap: Memory


class LeonCpu(msgspec.Struct):
    css: float | None
    mss: float | None


class Stream(msgspec.Struct):
    fps: float | None
    dropped: int


class CameraStats(msgspec.Struct):
    ts: float
    uptime: float | None
    temperature: Temperature
    memory: MemoryGroups
    leon_cpu: LeonCpu
    streams: dict[str, Stream]


class Commands(msgspec.Struct):
    succeeded: int
    failed: int
    rejected: int
    superseded: int


class AgentStats(msgspec.Struct):
    ts: float
    uptime: float
    cpu_percent: float | None
    rss_bytes: int | None
    loop_lag_max_ms: float
    messages_published: int
    detections_dropped: int
    commands: Commands


_counts = msgspec.json.Decoder(Counts)
_camera_stats = msgspec.json.Decoder(CameraStats)
_agent_stats = msgspec.json.Decoder(AgentStats)


def config_for(broker: Broker, tmp_path: Path, **changes: Any) -> Config:
    """One simulated camera showing nothing until the objects knob says otherwise."""
    config = make_config(
        broker,
        tmp_path,
        cameras=(camera_spec(CAM1, objects=0, fps=FPS), camera_spec(CAM2, objects=0)),
    )
    return msgspec.structs.replace(config, **changes)


def counts(obs: Observer, stream: str = "CAM_A") -> list[Counts]:
    """Every counts message seen (not the clearing ones)."""
    topic = obs.topics.counts(CAM1, stream)
    return [_counts.decode(m.payload) for m in obs.on(topic) if m.payload]


def shape(message: Counts) -> tuple[int, dict[str, int], list[str]]:
    return (message.total, message.by_label, message.present)


def _body(blob: Path, request_id: str, **extra: Any) -> dict[str, Any]:
    model = blob.read_bytes()
    return {
        "request_id": request_id,
        "nn_config": MOBILENET,
        "model": model,
        "labels": LABELS,
        **extra,
    }


async def deploy(obs: Observer, blob: Path, request_id: str, **extra: Any) -> None:
    await obs.deploy(CAM1, "CAM_A", _body(blob, request_id, **extra))
    event = await obs.outcome(request_id)
    assert event.state == "succeeded", event


async def schedule(obs: Observer, frames: list[list[Any]], *, loop: bool = False) -> None:
    payload = msgspec.json.encode({"frames": frames, "loop": loop})
    await obs.send(obs.topics.simulator(CAM1, "objects"), payload)


async def frames_pass(obs: Observer, frames: int, stream: str = "CAM_A") -> None:
    """Wait until the camera produced `frames` more frames (seen through its detections)."""
    topic = obs.topics.detections(CAM1, stream)

    def last_seq() -> int:
        found = obs.on(topic)
        return int(msgspec.json.decode(found[-1].payload)["seq"]) if found else 0

    start = await obs.wait_for(last_seq, what="detections")
    await obs.wait_for(lambda: last_seq() >= start + frames, what=f"{frames} more frames")


# --- counts and presence -------------------------------------------------------------------


async def test_counts_go_out_when_counts_change_and_only_then(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    output = {"counts_max_rate": 1000, "on_frames": 1, "off_seconds": 600}
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "c1", output=output)
        # the first frame counts nothing: one message says so
        first = await obs.wait_for(lambda: counts(obs), what="first counts")
        assert shape(first[0]) == (0, {}, [])
        await schedule(obs, [[1]] * 5 + [[1, 1]] * 5 + [[1, 2]] * 5 + [[]] * 5)
        expected = [
            (0, {}, []),
            (1, {"person": 1}, ["person"]),
            (2, {"person": 2}, ["person"]),
            (2, {"person": 1, "car": 1}, ["person", "car"]),
            # a label seen once stays, at 0
            (0, {"person": 0, "car": 0}, ["person", "car"]),
        ]
        await obs.wait_for(lambda: len(counts(obs)) >= len(expected), what="every change")
        await frames_pass(obs, 30)  # well past the schedule's end: its last frame stays
        seen = counts(obs)
        assert [shape(m) for m in seen] == expected
        assert [m.seq for m in seen] == [1, 2, 3, 4, 5]
        # retained: a dashboard subscribing now gets the latest at once
        latest = await retained(broker, obs.topics.counts(CAM1, "CAM_A"))
        assert shape(_counts.decode(latest)) == expected[-1]
        # the per-frame detections show the same frames
        per_frame = [len(d["detections"]) for d in obs.detections(CAM1, "CAM_A")]
        assert {0, 1, 2} <= set(per_frame)


async def test_presence_holds_over_one_missed_frame_and_goes_after_off_seconds(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    output = {"counts_max_rate": 1000, "on_frames": 2, "off_seconds": 1.0}
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "p1", output=output)
        await obs.wait_for(lambda: counts(obs), what="first counts")
        await schedule(obs, [[1]] * 6 + [[]] + [[1]] * 6 + [[]])
        # the end: absent once a second passed without a person
        await obs.wait_for(
            lambda: len(counts(obs)) > 2 and counts(obs)[-1].present == [],
            what="person absent",
        )
        seen = [shape(m) for m in counts(obs)]
        assert seen == [
            (0, {}, []),
            (1, {"person": 1}, []),  # one frame: not present yet
            (1, {"person": 1}, ["person"]),  # two in a row: present
            (0, {"person": 0}, ["person"]),  # the missed frame: counted, still present
            (1, {"person": 1}, ["person"]),
            (0, {"person": 0}, ["person"]),  # gone from the frame...
            (0, {"person": 0}, []),  # ... and absent after off_seconds
        ]
        messages = counts(obs)
        # absent no sooner than off_seconds after the last frame with a person (one frame
        # before the count went to 0); a lower bound only: the agent cannot be early
        assert messages[-1].ts - messages[-2].ts >= 1.0 - 2 / FPS


async def test_without_frames_presence_times_out_and_the_count_goes_to_zero(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    output = {"counts_max_rate": 1000, "on_frames": 1, "off_seconds": 1.0}
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "u1", output=output)
        await schedule(obs, [[1]], loop=True)
        await obs.wait_for(lambda: counts(obs) and counts(obs)[-1].present == ["person"])
        await obs.send(obs.topics.simulator(CAM1, "unplug"), b"")  # no more frames
        await obs.wait_for(lambda: obs.latest(obs.topics.camera_availability(CAM1)) == b"offline")
        await obs.wait_for(lambda: counts(obs)[-1].present == [], what="absent")
        # the count the last frame left is not kept once nothing has been seen for a while
        assert shape(counts(obs)[-1]) == (0, {"person": 0}, [])


async def test_min_confidence_filters_before_counting_and_publishing(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    output = {"min_confidence": 0.8, "on_frames": 1}
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "m1", output=output)
        await schedule(
            obs,
            [[{"label": 1, "confidence": 0.95}, {"label": 2, "confidence": 0.6}, 1]],
            loop=True,
        )
        await obs.wait_for(lambda: any(m.total for m in counts(obs)), what="counted")
        await frames_pass(obs, 10)
        assert shape(counts(obs)[-1]) == (2, {"person": 2}, ["person"])  # no car: 0.6 < 0.8
        shown = [d["detections"] for d in obs.detections(CAM1, "CAM_A") if d["detections"]]
        assert shown
        for detections in shown:
            assert [d["label_name"] for d in detections] == ["person", "person"]
            assert all(d["confidence"] >= 0.8 for d in detections)


async def test_max_rate_bounds_the_detections_and_counts_still_follow_every_frame(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    rate = 4.0
    output = {"max_rate": rate, "counts_max_rate": 1000, "on_frames": 1, "off_seconds": 600}
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "r1", output=output)
        await schedule(obs, [[1], [1, 1]], loop=True)  # every frame changes the counts
        await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_A")) >= 12, what="messages")
        messages = obs.detections(CAM1, "CAM_A")
        span = messages[-1]["seq"] - messages[0]["seq"]  # frames between first and last
        # at 20 fps and 4/s about one frame in five goes out; frames above the rate are
        # skipped, not queued: generous bounds, counted in frames, not timed
        assert len(messages) - 1 <= span * rate / FPS * 1.5 + 2
        assert span >= (len(messages) - 1) * 2
        # the counts saw every frame in between, not only the published ones
        frame_seqs = [m.frame_seq for m in _frames(obs)]
        assert len(frame_seqs) > len(messages)


async def test_counts_max_rate_bounds_counts_and_the_latest_state_still_goes_out(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    output = {"counts_max_rate": 2, "on_frames": 1, "off_seconds": 600}
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "cr1", output=output)
        await schedule(obs, [[1], [1, 1]], loop=True)  # a change on every frame
        await obs.wait_for(lambda: len(counts(obs)) >= 5, what="counts")
        seen = _frames(obs)
        span = seen[-1].frame_seq - seen[0].frame_seq
        # 2 a second at 20 fps: one message per 10 frames or more (generous margin)
        assert len(seen) - 1 <= span * 2 / FPS * 1.5 + 1
        # the changes stop: the final state goes out, at once or when the window opens
        await schedule(obs, [[1, 1, 1]])
        await obs.wait_for(lambda: counts(obs)[-1].total == 3, what="the latest state")


def _frames(obs: Observer) -> list[Any]:
    topic = obs.topics.counts(CAM1, "CAM_A")
    return [msgspec.json.decode(m.payload, type=_WithFrame) for m in obs.on(topic) if m.payload]


class _WithFrame(msgspec.Struct):
    frame_seq: int


async def test_output_change_needs_no_restart_and_survives_one(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    async with agent_and_observer(broker, config) as (app, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "o1")
        await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_A")) >= 3, what="detections")
        restarts = app.coordinator.workers[CAM1].restarts
        status = obs.topics.nn_status(CAM1, "CAM_A")
        assert obs.latest_json(status)["output"] == msgspec.to_builtins(OutputOptions())
        # the same model and config; only the output changes: no per-frame messages now
        await deploy(obs, own_blobs["ssd_tiny"], "o2", output={"max_rate": 0, "on_frames": 1})
        assert obs.states("o2") == ["accepted", "succeeded"]
        last_before = max(d["seq"] for d in obs.detections(CAM1, "CAM_A"))
        await obs.wait_for(lambda: obs.latest_json(status)["request_id"] == "o2")
        assert obs.latest_json(status)["output"]["max_rate"] == 0
        assert app.coordinator.workers[CAM1].restarts == restarts
        assert obs.latest_json(obs.topics.camera_status(CAM1))["restarts"] == restarts
        # counts go on (each frame changes them), detections do not
        await schedule(obs, [[1], []], loop=True)
        await obs.wait_for(
            lambda: any(m.frame_seq > last_before + 30 for m in _frames(obs)), what="frames"
        )
        late = [d for d in obs.detections(CAM1, "CAM_A") if d["seq"] > last_before + 5]
        assert late == []
    # the agent restarts from its state file: the output is restored with the NN
    async with agent_and_observer(broker, config) as (app, obs):
        await obs.wait_for(
            lambda: (
                (s := obs.latest_json(obs.topics.nn_status(CAM1, "CAM_A")))
                and s["state"] == "running"
            )
        )
        restored = app.coordinator.workers[CAM1].running["CAM_A"].output
        assert restored == OutputOptions(max_rate=0.0, on_frames=1)


async def test_config_output_is_the_default_and_a_deploy_overrides_field_by_field(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    default = OutputOptions(min_confidence=0.7, on_frames=5)
    config = config_for(broker, tmp_path, output=default)
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "d1", output={"on_frames": 1})
        status = obs.latest_json(obs.topics.nn_status(CAM1, "CAM_A"))
        assert status["output"]["min_confidence"] == 0.7  # from the agent's [output]
        assert status["output"]["on_frames"] == 1  # from the deploy


async def test_counts_cleared_when_the_nn_is_deleted_and_none_for_generic(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "x1")
        topic = obs.topics.counts(CAM1, "CAM_A")
        await obs.wait_for(lambda: counts(obs), what="counts")
        await obs.delete(CAM1, "CAM_A", {"request_id": "x2"})
        assert (await obs.outcome("x2")).state == "succeeded"
        cleared = await obs.wait_for(lambda: obs.on(topic)[-1].payload == b"", what="cleared")
        assert cleared
        # a Generic network: layers rate-limited, nothing counted
        body = {
            "request_id": "g1",
            "nn_config": {"type": "Generic"},
            "model": own_blobs["gray_tiny"].read_bytes(),
            "output": {"max_rate": 5},
        }
        await obs.deploy(CAM1, "CAM_B", body)
        assert (await obs.outcome("g1")).state == "succeeded"
        await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_B")) >= 6, what="layers")
        layers = obs.detections(CAM1, "CAM_B")
        assert layers[-1]["seq"] - layers[0]["seq"] >= (len(layers) - 1) * 2
        assert obs.on(obs.topics.counts(CAM1, "CAM_B")) == []


async def test_a_schedule_in_the_config_runs_from_the_start(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    schedule = ObjectSchedule(frames=((1, 1), (1, 1), (1,), (1,)))
    config = make_config(broker, tmp_path, cameras=(camera_spec(CAM1, schedule=schedule),))
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "k1", output={"counts_max_rate": 1000})
        await obs.wait_for(lambda: len(counts(obs)) >= 3, what="counts changing")
        assert {m.by_label["person"] for m in counts(obs)} == {1, 2}


async def test_with_signing_required_the_objects_knob_takes_a_signed_envelope(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    key = Ed25519PrivateKey.generate()
    section = SecuritySection(
        require_signed=True,
        keys=(SecurityKey(id="ops", public_key=public_key_text(key.public_key())),),
    )
    config = config_for(broker, tmp_path, security=section)
    async with agent_and_observer(broker, config) as (_, obs):
        body = _body(own_blobs["ssd_tiny"], "e1", output={"counts_max_rate": 1000})
        body["expires_at"] = time.time() + 60
        topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        payload = msgspec.json.encode(body)
        await obs.send(topic, envelope(payload, "ops", sign(key, topic, payload)))
        assert (await obs.outcome("e1")).state == "succeeded"
        await obs.wait_for(lambda: counts(obs), what="first counts")
        knob = obs.topics.simulator(CAM1, "objects")
        unsigned = msgspec.json.encode({"frames": [[1, 1, 1]]})
        await obs.send(knob, unsigned)  # refused: unsigned
        await frames_pass(obs, 10)
        assert all(m.total == 0 for m in counts(obs))
        schedule = msgspec.json.encode({"frames": [[1]]})
        await obs.send(knob, envelope(schedule, "ops", sign(key, knob, schedule)))
        await obs.wait_for(lambda: counts(obs)[-1].total == 1, what="the signed schedule")


async def test_a_bad_objects_schedule_is_reported_naming_the_field(
    broker: Broker, tmp_path: Path
) -> None:
    config = config_for(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        topic = obs.topics.simulator(CAM1, "objects")
        await obs.send(topic, b'{"frames": [[1, {"label": 2, "confidence": 7}]]}')
        error = await obs.wait_for(lambda: obs.latest_json(obs.topics.errors), what="error")
        assert error["code"] == "invalid_payload"
        assert "`$.frames[0][1].confidence`" in error["message"]
        await obs.send(topic, b"[]")
        await obs.wait_for(lambda: len(obs.on(obs.topics.errors)) == 2, what="second error")
        assert "`$`" in obs.latest_json(obs.topics.errors)["message"]
        # the agent carries on: it still answers
        before = len(obs.on(obs.topics.stats))
        await obs.send(obs.topics.stats_request, b"")
        await obs.wait_for(lambda: len(obs.on(obs.topics.stats)) > before, what="stats")


# --- health stats ---------------------------------------------------------------------------


def camera_stats(obs: Observer, mxid: str) -> list[CameraStats]:
    return [_camera_stats.decode(m.payload) for m in obs.on(obs.topics.camera_stats(mxid))]


def agent_stats(obs: Observer) -> list[AgentStats]:
    return [_agent_stats.decode(m.payload) for m in obs.on(obs.topics.stats)]


async def test_stats_have_the_agreed_shape_and_plausible_values(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    section = msgspec.structs.replace(config.agent, stats_interval=3600.0)
    config = msgspec.structs.replace(config, agent=section)
    async with agent_and_observer(broker, config) as (_, obs):
        # published once at start: nothing runs, so the device figures are unknown
        start = await obs.wait_for(lambda: camera_stats(obs, CAM2), what="camera stats")
        assert start[0].uptime is None
        assert start[0].temperature == Temperature(None, None, None, None, None)
        assert start[0].memory.ddr == Memory(None, None, None)
        await obs.wait_for(lambda: agent_stats(obs), what="agent stats")

        await deploy(obs, own_blobs["ssd_tiny"], "s1")
        await obs.deploy(CAM1, "CAM_A", {"request_id": "bad", "nn_config": {"type": "SSD"}})
        assert (await obs.outcome("bad")).state == "rejected"
        await frames_pass(obs, 30)  # over a second of frames: an fps window
        before = len(agent_stats(obs))
        await obs.send(obs.topics.stats_request, b"")
        await obs.wait_for(lambda: len(agent_stats(obs)) > before, what="stats on request")
        await obs.wait_for(lambda: len(camera_stats(obs, CAM1)) >= 2)

        cam = camera_stats(obs, CAM1)[-1]
        assert cam.uptime is not None
        assert cam.uptime > 0
        temperature = msgspec.to_builtins(cam.temperature)
        assert all(35.0 <= t <= 65.0 for t in temperature.values()), temperature
        for memory in (cam.memory.ddr, cam.memory.cmx, cam.memory.leon_css_heap):
            assert memory.used is not None
            assert memory.total is not None
            assert 0 < memory.used <= memory.total
            assert memory.percent == pytest.approx(100 * memory.used / memory.total, abs=0.01)
        assert cam.leon_cpu.css is not None
        assert 0 < cam.leon_cpu.css < 100
        assert list(cam.streams) == ["CAM_A"]
        fps = cam.streams["CAM_A"].fps
        assert fps is not None
        assert 0.3 * FPS < fps < 1.5 * FPS  # from the frames counted; generous under load
        assert cam.streams["CAM_A"].dropped == 0
        idle = camera_stats(obs, CAM2)[-1]
        assert (idle.uptime, idle.streams) == (None, {})

        agent = agent_stats(obs)[-1]
        assert agent.uptime > 0
        assert agent.cpu_percent is not None
        assert agent.cpu_percent >= 0
        assert agent.rss_bytes is not None
        assert agent.rss_bytes > 10 * 1024 * 1024
        assert agent.loop_lag_max_ms >= 0
        assert agent.messages_published > 30
        assert agent.detections_dropped == 0
        assert agent.commands == Commands(succeeded=1, failed=0, rejected=1, superseded=0)
        assert _agent_stats.decode(await retained(broker, obs.topics.stats)) == agent
        camera = await retained(broker, obs.topics.camera_stats(CAM1))
        assert _camera_stats.decode(camera) == cam


async def test_a_retained_stats_request_is_not_executed(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = config_for(broker, tmp_path)
    section = msgspec.structs.replace(config.agent, stats_interval=3600.0)
    config = msgspec.structs.replace(config, agent=section)
    async with agent_and_observer(broker, config) as (_, obs):
        await deploy(obs, own_blobs["ssd_tiny"], "q1")
        await obs.wait_for(lambda: agent_stats(obs), what="stats at start")
        published = len(agent_stats(obs))
        await obs.send(obs.topics.stats_request, b"", retain=True)
        await frames_pass(obs, 20)  # a second of frames: handled long since, if at all
        assert len(agent_stats(obs)) == published
        await obs.send(obs.topics.stats_request, b"")
        await obs.wait_for(lambda: len(agent_stats(obs)) > published, what="stats")
        await obs.send(obs.topics.stats_request, b"", retain=True)  # clear it from the broker


async def test_stats_published_every_interval(broker: Broker, tmp_path: Path) -> None:
    config = config_for(broker, tmp_path)
    section = msgspec.structs.replace(config.agent, stats_interval=1.0)
    config = msgspec.structs.replace(config, agent=section)
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.wait_for(lambda: len(agent_stats(obs)) >= 3, what="three intervals")
        ts = [s.ts for s in agent_stats(obs)]
        assert ts == sorted(ts)
        assert len(camera_stats(obs, CAM1)) >= 3


async def retained(broker: Broker, topic: str) -> bytes:
    """The retained message a client subscribing now receives on `topic`."""
    protocol = aiomqtt.ProtocolVersion.V5 if broker.mqtt5 else aiomqtt.ProtocolVersion.V311
    identifier = f"retained-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=protocol, identifier=identifier
    ) as client:
        await client.subscribe(topic, qos=1)
        with anyio.fail_after(WAIT):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError(topic)  # pragma: no cover


# --- the README's dashboards examples, run as a user runs them --------------------------------

ROOT = Path(__file__).resolve().parent.parent
_MOSQUITTO_SUB_TIMED_OUT = 27  # how `mosquitto_sub -W` ends


def readme_commands(heading: str) -> list[str]:
    """The shell commands of the first sh block under `heading` (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.removesuffix("\\") if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")
async def test_the_dashboards_examples_work_as_written(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config = make_config(broker, tmp_path / "state", cameras=(camera_spec(CAM1),))
    agent_id = config.agent.id
    client_config = tmp_path / "client.toml"
    client_config.write_text(
        f'[agent]\nid = "{agent_id}"\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'prefix = "oaktest"\nprotocol = "{broker.protocol}"\n'
    )
    commands = [
        command.replace("--config config/demo.toml", f"--config {client_config}")
        .replace("-p 1883", f"-p {broker.port}")
        .replace("oak/demo/", f"oaktest/{agent_id}/")
        for command in readme_commands("### Dashboards")
    ]
    assert [c.split()[0] for c in commands] == [
        ".venv/bin/oak-agent",
        "mosquitto_sub",
        "mosquitto_pub",
        "mosquitto_pub",
    ]
    async with agent_and_observer(broker, config) as (app, obs):
        results = []
        for command in commands:
            with anyio.fail_after(WAIT):
                results.append(
                    await anyio.run_process(["bash", "-c", command], check=False, cwd=ROOT)
                )
        deployed, watched, requested, scheduled = results
        assert deployed.returncode == 0, deployed
        assert b'"state":"succeeded"' in deployed.stdout.splitlines()[-1]
        assert watched.returncode == _MOSQUITTO_SUB_TIMED_OUT, watched
        shown = {line.split()[0] for line in watched.stdout.decode().splitlines()}
        assert {
            obs.topics.counts(CAM1, "CAM_A"),
            obs.topics.stats,
            obs.topics.camera_stats(CAM1),
        } <= shown
        assert (requested.returncode, scheduled.returncode) == (0, 0)
        running = app.coordinator.workers[CAM1].running["CAM_A"].output
        assert running == OutputOptions(max_rate=2.0, min_confidence=0.6)
        # the schedule: label 15 twice for three frames, then once, again and again
        await obs.wait_for(
            lambda: {m.by_label.get("15") for m in counts(obs)} >= {1, 2}, what="the schedule"
        )
