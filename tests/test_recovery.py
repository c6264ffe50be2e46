"""Nothing lost: broker restarts, agent crashes, broken or unwritable state, with real processes.

Each scenario prints the commands it sent, how many the agent executed (one `accepted` or
immediate outcome each) and how many got a final answer, and asserts the three are equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import run_broker
from tests.harness import (
    CAM1,
    CAM2,
    YOLO,
    agent_and_observer,
    camera_spec,
    make_config,
    observe,
    running_agent,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from agent.messages import Event
    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio


def _tally(obs: Observer, ids: list[str], scenario: str) -> None:
    executed = [i for i in ids if "accepted" in obs.states(i)]
    answered = [i for i in ids if len([e for e in obs.events(i) if e.terminal]) == 1]
    print(f"{scenario}: sent={len(ids)} executed={len(executed)} answered={len(answered)}")
    assert len(executed) == len(ids)
    assert len(answered) == len(ids)
    for request_id in ids:
        assert obs.states(request_id).count("accepted") == 1, request_id


async def test_broker_restart_during_deploy(
    tmp_path: Path, own_blobs: dict[str, Path], broker: Broker
) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto: amqtt queues for offline sessions only with auth")
    blob = own_blobs["yolo_tiny"].read_bytes()
    workdir = tmp_path / "broker"
    with contextlib.ExitStack() as first_broker:
        first = first_broker.enter_context(run_broker("mosquitto", workdir, persistence=True))
        cameras = (camera_spec(CAM1, boot_seconds=1.5), camera_spec(CAM2, boot_seconds=0.2))
        config = make_config(first, tmp_path / "state", cameras=cameras)
        slow = msgspec.structs.replace(config.mqtt, reconnect_min=2.0, reconnect_max=3.0)
        config = msgspec.structs.replace(config, mqtt=slow)
        async with running_agent(config) as app:
            topics = app.topics
            async with observe(first, topics) as obs:
                await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
                await obs.deploy(
                    CAM2, "CAM_A", {"request_id": "live", "nn_config": YOLO, "model": blob}
                )
                await obs.outcome("live")
                await obs.deploy(
                    CAM1, "CAM_A", {"request_id": "inflight", "nn_config": YOLO, "model": blob}
                )
                await obs.wait_for(lambda: "applying" in obs.states("inflight"))
            connects = app.link.stats.connects
            # graceful stop: mosquitto writes sessions and queued messages to disk
            first_broker.close()
            with run_broker("mosquitto", workdir, port=first.port, persistence=True) as second:
                async with observe(second, topics) as obs:
                    ids = [f"queued-{n}" for n in range(6)]
                    for n, request_id in enumerate(ids):
                        camera = CAM2 if n < 3 else CAM1
                        stream = ("CAM_B", "CAM_C", "DEPTH_B_C")[n % 3]
                        body = {"request_id": request_id, "nn_config": YOLO, "model": blob}
                        await obs.deploy(camera, stream, body)
                    assert app.link.stats.connects == connects, "agent reconnected too early"
                    await obs.wait_for(lambda: app.link.stats.connects > connects)
                    assert (await obs.outcome("inflight")).state == "succeeded"
                    for request_id in ids:
                        assert (await obs.outcome(request_id)).state == "succeeded"
                    _tally(obs, ids, "broker restart: commands sent while the agent was away")
                    dropped = app.link.stats.detections_dropped_disconnected
                    print(f"broker restart: detections dropped while disconnected={dropped}")
                    assert dropped > 0
                    await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")


async def test_retained_state_is_republished_after_broker_loses_it(
    tmp_path: Path, broker: Broker
) -> None:
    """A broker restarted without persistence forgets retained messages; the agent resends."""
    if broker.kind != "mosquitto":
        pytest.skip("restarts a mosquitto of its own")
    workdir = tmp_path / "broker"
    with contextlib.ExitStack() as first_broker:
        first = first_broker.enter_context(run_broker("mosquitto", workdir))
        config = make_config(first, tmp_path / "state")
        async with running_agent(config) as app:
            topics = app.topics
            async with observe(first, topics) as obs:
                await obs.wait_for(lambda: obs.latest(topics.camera_status(CAM2)))
            connects = app.link.stats.connects
            first_broker.close()
            with run_broker("mosquitto", workdir, port=first.port) as second:
                async with observe(second, topics) as obs:
                    await obs.wait_for(lambda: app.link.stats.connects > connects)
                    wanted = (
                        topics.availability,
                        topics.info,
                        topics.camera_status(CAM1),
                        topics.camera_availability(CAM2),
                        topics.nn_status(CAM1, "DEPTH_B_C"),
                    )
                    await obs.wait_for(lambda: all(obs.latest(t) for t in wanted))
                    assert obs.latest(topics.availability) == b"online"


async def test_sigkill_mid_apply_then_restart(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    config_path = tmp_path / "agent.toml"
    agent_id = f"kill-{os.getpid()}-{tmp_path.name[-6:]}"
    write_config(config_path, broker, tmp_path / "state", agent_id, boot_seconds=2.0)
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(broker, topics) as obs:
        with agent_process(config_path, tmp_path / "agent.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await obs.deploy(CAM1, "CAM_A", {"request_id": "cut", "nn_config": YOLO, "model": blob})
            await obs.wait_for(lambda: "applying" in obs.states("cut"))
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        # the broker publishes the will
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        with agent_process(config_path, tmp_path / "agent.log"):
            cut = await obs.outcome("cut")
            assert cut.state == "failed"
            assert cut.error is not None
            assert cut.error.code == "interrupted"
            # and yet the camera converges to the accepted desired set
            await obs.wait_for(
                lambda: (
                    (s := obs.latest_json(topics.nn_status(CAM1, "CAM_A")))
                    and s["state"] == "running"
                    and s["model"]["sha256"] == sha
                )
            )
            await obs.wait_for(lambda: obs.detections(CAM1, "CAM_A"))
            # the model is served from the store: no re-upload needed
            await obs.deploy(
                CAM1, "CAM_B", {"request_id": "by-sha", "nn_config": YOLO, "model_sha256": sha}
            )
            assert (await obs.outcome("by-sha")).state == "succeeded"
            _tally_answers(obs, ["cut", "by-sha"], "SIGKILL mid-apply")


@contextlib.contextmanager
def _unwritable(folder: Path) -> Iterator[None]:
    """`folder` cannot be written, even by root: it is moved away and a file takes its place."""
    aside = folder.with_name(f"{folder.name}.aside")
    folder.rename(aside)
    folder.write_text("a file where the state folder should be")
    try:
        yield
    finally:
        folder.unlink()
        aside.rename(folder)


async def test_no_answer_is_undone_by_a_crash_while_the_state_dir_is_unwritable(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """Defect: a delete answered `succeeded` while the state could not be written ran again
    after a SIGKILL and a restart. Now whatever was answered holds after the restart."""
    blob = own_blobs["yolo_tiny"].read_bytes()
    box = tmp_path / "box"
    config_path = tmp_path / "agent.toml"
    agent_id = f"undo-{os.getpid()}-{tmp_path.name[-6:]}"
    write_config(config_path, broker, box / "state", agent_id, boot_seconds=2.0)
    topics = Topics.for_agent("oaktest", agent_id)
    cam_a = topics.nn_status(CAM1, "CAM_A")
    async with observe(broker, topics) as obs:
        with agent_process(config_path, tmp_path / "agent.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            for stream in ("CAM_A", "CAM_B"):
                body = {"request_id": f"run-{stream}", "nn_config": YOLO, "model": blob}
                await obs.deploy(CAM1, stream, body)
                assert (await obs.outcome(f"run-{stream}")).state == "succeeded"
            # refused while the folder is unwritable: nothing changes
            with _unwritable(box):
                await obs.delete(CAM1, "CAM_A", {"request_id": "refused"})
                refused = await obs.outcome("refused")
            assert refused.state == "rejected"
            assert refused.error is not None
            assert refused.error.code == "state_write_failed"
            assert obs.latest_json(cam_a)["state"] == "running"
            # accepted (on disk), then the folder fails while the camera applies it
            await obs.delete(CAM1, "CAM_A", {"request_id": "gone"})
            await obs.wait_for(lambda: "applying" in obs.states("gone"))
            with _unwritable(box):
                errors = len(_errors(obs))
                await obs.wait_for(lambda: obs.latest_json(cam_a)["state"] == "none")
                await obs.wait_for(lambda: len(_errors(obs)) > errors, what="state_write_failed")
                assert _errors(obs)[-1]["code"] == "state_write_failed"
                assert obs.terminal("gone") is None  # the answer waits for a write that works
                os.kill(first.pid, signal.SIGKILL)
                first.wait(timeout=10)
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        seen_a = len(obs.detections(CAM1, "CAM_A"))
        seen_b = len(obs.detections(CAM1, "CAM_B"))
        with agent_process(config_path, tmp_path / "agent.log"):
            gone = await obs.outcome("gone")
            assert gone.state == "failed"
            assert gone.error is not None
            assert gone.error.code == "interrupted"
            # CAM_B detects again after the restart, CAM_A (deleted) never does
            await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_B")) > seen_b + 5)
            assert obs.latest_json(cam_a)["state"] == "none"
            assert len(obs.detections(CAM1, "CAM_A")) == seen_a
            # the same request_id is answered from the record, not run again
            await obs.delete(CAM1, "CAM_A", {"request_id": "gone"})
            replayed = await obs.wait_for(lambda: _terminals(obs, "gone")[1:], what="replay")
            assert replayed == [gone]
            assert obs.states("gone").count("accepted") == 1
            # the refused one was never recorded: sent again, it runs now
            await obs.delete(CAM1, "CAM_A", {"request_id": "refused"})
            again = await obs.wait_for(lambda: _terminals(obs, "refused")[1:], what="rerun")
            assert [e.state for e in again] == ["succeeded"]
            print(
                "unwritable state dir + SIGKILL: refused stayed refused, the delete stayed "
                f"done (answered {gone.error.code} after the restart), replayed={len(replayed)}"
            )


def _tally_answers(obs: Observer, ids: list[str], scenario: str) -> None:
    answered = [i for i in ids if len([e for e in obs.events(i) if e.terminal]) == 1]
    print(f"{scenario}: sent={len(ids)} executed={len(ids)} answered={len(answered)}")
    assert len(answered) == len(ids)


async def test_truncated_state_file_is_kept_aside(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    config = make_config(broker, tmp_path / "state")
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", {"request_id": "before", "nn_config": YOLO, "model": blob})
        await obs.outcome("before")
    state_file = tmp_path / "state" / "state.json"
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])  # a torn write on a filesystem without rename
    async with agent_and_observer(broker, config) as (app, obs):
        error = await obs.wait_for(lambda: obs.latest_json(obs.topics.errors))
        assert error["code"] == "state_unreadable"
        assert "kept as state.json.unreadable-" in error["message"]
        assert list((tmp_path / "state").glob("state.json.unreadable-*"))
        await obs.deploy(CAM1, "CAM_A", {"request_id": "after", "nn_config": YOLO, "model": blob})
        assert (await obs.outcome("after")).state == "succeeded"
        assert app.coordinator.workers[CAM1].restarts == 1
        _tally(obs, ["after"], "truncated state file")
    restored = msgspec.json.decode(state_file.read_bytes())
    assert restored["cameras"][CAM1]["last_good"]["CAM_A"]["request_id"] == "after"


async def test_unwritable_state_dir_keeps_serving(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """Nothing is accepted that is not on disk: commands are refused, the agent stays up,
    and once the folder can be written the same commands go through."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")  # fails for root too
    config = make_config(broker, blocker / "state")
    blob = own_blobs["ssd_tiny"].read_bytes()
    body = {"request_id": "ro", "nn_config": {"type": "MobileNet"}, "model": blob}
    async with agent_and_observer(broker, config) as (app, obs):
        await obs.deploy(CAM1, "CAM_A", body)
        refused = await obs.outcome("ro")
        await obs.delete(CAM1, "CAM_B", {"request_id": "nothing-there"})
        refused_too = await obs.outcome("nothing-there")  # needs a write: refused as well
        for event in (refused, refused_too):
            assert event.state == "rejected"
            assert event.error is not None
            assert event.error.code == "state_write_failed"
        wanted = {"state_write_failed", "model_write_failed"}
        await obs.wait_for(lambda: {m["code"] for m in _errors(obs)} >= wanted)
        print(f"unwritable state dir: errors reported={sorted(wanted)}")
        assert "CAM_A" not in app.coordinator.workers[CAM1].running
        assert app.coordinator.workers[CAM1].restarts == 0
        blocker.unlink()  # the disk is back
        await obs.deploy(CAM1, "CAM_A", body)  # the same id: a refusal is not recorded
        again = await obs.wait_for(lambda: _terminals(obs, "ro")[1:], what="a second answer")
        assert [e.state for e in again] == ["succeeded"]
        await obs.wait_for(lambda: obs.detections(CAM1, "CAM_A"))
        assert app.coordinator.workers[CAM1].running["CAM_A"].request_id == "ro"
    assert (blocker / "state" / "state.json").exists()


def _terminals(obs: Observer, request_id: str) -> list[Event]:
    return [e for e in obs.events(request_id) if e.terminal]


def _errors(obs: Observer) -> list[Any]:
    return [msgspec.json.decode(m.payload) for m in obs.on(obs.topics.errors)]


async def test_restart_restores_two_cameras_and_duplicate_ids(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    yolo = own_blobs["yolo_tiny"].read_bytes()
    ssd = own_blobs["ssd_tiny"].read_bytes()
    config = make_config(broker, tmp_path / "state")
    async with agent_and_observer(broker, config) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", {"request_id": "one", "nn_config": YOLO, "model": yolo})
        await obs.deploy(
            CAM2,
            "DEPTH_B_C",
            {"request_id": "two", "nn_config": {"type": "MobileNet"}, "model": ssd},
        )
        first = [await obs.outcome(i) for i in ("one", "two")]
    async with agent_and_observer(broker, config) as (app, obs):
        await obs.wait_for(
            lambda: obs.detections(CAM1, "CAM_A") and obs.detections(CAM2, "DEPTH_B_C")
        )
        assert app.coordinator.workers[CAM1].restarts == 1  # one boot each to restore
        assert app.coordinator.workers[CAM2].restarts == 1
        # a repeated request_id is answered from the record that survived the restart
        await obs.deploy(CAM1, "CAM_A", {"request_id": "one", "nn_config": YOLO, "model": yolo})
        replayed = await obs.outcome("one")
        assert replayed == first[0]
        assert app.coordinator.workers[CAM1].restarts == 1


async def test_terminal_events_follow_the_state_write_that_records_them(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """After a crash a request gets its own answer or `interrupted`, never both.

    So when a terminal event arrives, state.json already lists the request among the
    outcomes and no longer among the unfinished ones: checked for every way to end.
    """
    yolo = own_blobs["yolo_tiny"].read_bytes()
    state_file = tmp_path / "state" / "state.json"
    config = make_config(broker, tmp_path / "state")

    def recorded(request_id: str) -> tuple[bool, bool]:
        document: Any = msgspec.json.decode(state_file.read_bytes())
        finished = any(o["request_id"] == request_id for o in document["outcomes"])
        unfinished = any(r["request_id"] == request_id for r in document["in_flight"])
        return finished, unfinished

    async with agent_and_observer(broker, config) as (_, obs):
        body = {"nn_config": YOLO, "model": yolo}
        await obs.deploy(CAM1, "CAM_A", body | {"request_id": "first"})
        await obs.wait_for(lambda: "applying" in obs.states("first"))
        await obs.deploy(CAM1, "CAM_B", body | {"request_id": "queued"})
        await obs.deploy(CAM1, "CAM_B", body | {"request_id": "replacing"})
        await obs.delete(CAM1, "CAM_C", {"request_id": "no-restart"})
        await obs.send(obs.topics.simulator(CAM2, "fail_next_boot"), b"")
        await obs.deploy(CAM2, "CAM_A", body | {"request_id": "failing"})
        expected = {
            "first": "succeeded",
            "queued": "superseded",
            "replacing": "succeeded",
            "no-restart": "succeeded",
            "failing": "failed",
        }
        seen: dict[str, tuple[str, tuple[bool, bool]]] = {}

        def check_new_terminal_events() -> bool:
            # runs as soon as the observer records a message: the file is read right then
            for request_id in expected:
                event = obs.terminal(request_id)
                if request_id not in seen and event is not None:
                    seen[request_id] = (event.state, recorded(request_id))
            return len(seen) == len(expected)

        await obs.wait_for(check_new_terminal_events, what="every terminal event")
        assert seen == {r: (state, (True, False)) for r, state in expected.items()}


async def test_commands_in_flight_at_a_clean_shutdown_are_each_answered_once(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """Stop the agent while commands are queued, handled and applied; start it again.

    Whatever the timing, every command ends with exactly one terminal event: its own
    outcome, `rejected`/`shutting_down` (received but not handled before the stop), or
    `failed`/`interrupted` (accepted, then answered after the restart).
    """
    slow = tuple(camera_spec(mxid, boot_seconds=3.0) for mxid in (CAM1, CAM2))
    config = make_config(broker, tmp_path / "state", cameras=slow)
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
            # events leave in order: once this is answered, no late second answer is on its way
            await obs.delete(CAM2, "DEPTH_B_C", {"request_id": "barrier"})
            await obs.outcome("barrier")
            terminal = {i: [e for e in obs.events(i) if e.terminal] for i in ids}
            codes = {
                i: (t[0].state, t[0].error.code if t[0].error else None)
                for i, t in terminal.items()
            }
            print(
                f"clean shutdown: sent={len(ids)} answered={len(codes)} outcomes={sorted(codes.values())}"
            )
            assert all(len(t) == 1 for t in terminal.values()), terminal
            allowed = {
                ("succeeded", None),
                ("superseded", None),
                ("failed", "interrupted"),
                ("rejected", "shutting_down"),
            }
            assert set(codes.values()) <= allowed, codes


async def test_commands_arriving_together_are_each_accepted_after_the_write_that_records_them(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """State writes are grouped, and still: when `accepted` (or an answer that needed no
    restart) arrives, state.json records the request; each gets one accepted, one answer."""
    yolo = own_blobs["yolo_tiny"].read_bytes()
    sha = hashlib.sha256(yolo).hexdigest()
    state_file = tmp_path / "state" / "state.json"
    config = make_config(broker, tmp_path / "state")

    def recorded(request_id: str) -> bool:
        document: Any = msgspec.json.decode(state_file.read_bytes())
        return any(o["request_id"] == request_id for o in document["outcomes"]) or any(
            r["request_id"] == request_id for r in document["in_flight"]
        )

    async with agent_and_observer(broker, config) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", {"request_id": "upload", "nn_config": YOLO, "model": yolo})
        await obs.outcome("upload")
        commands: list[tuple[str, str, str, dict[str, Any]]] = []
        for n in range(24):
            camera, stream = (CAM1, CAM2)[n % 2], ("CAM_A", "CAM_B", "CAM_C")[n % 3]
            if n % 4 == 3:  # CAM_C never runs anything: answered without a restart
                body: dict[str, Any] = {"request_id": f"g{n}"}
                commands.append((f"g{n}", camera, "CAM_C", body))
            else:  # same-stream deploys supersede each other
                threshold = 0.1 + n / 100
                body = {"request_id": f"g{n}", "nn_config": _yolo(threshold), "model_sha256": sha}
                commands.append((f"g{n}", camera, stream, body))
        commands.append(commands[0])  # the same id again, at once: not run twice
        ids = list(dict.fromkeys(c[0] for c in commands))
        async with anyio.create_task_group() as tg:
            for _, camera, stream, body in commands:
                if "model_sha256" in body:
                    tg.start_soon(obs.deploy, camera, stream, body)
                else:
                    tg.start_soon(obs.delete, camera, stream, body)
        checked: dict[str, bool] = {}

        def check_new_accepted() -> bool:
            # runs as soon as the observer records a message: the file is read right then
            for request_id in ids:
                if request_id not in checked and "accepted" in obs.states(request_id):
                    checked[request_id] = recorded(request_id)
            return len(checked) == len(ids) and all(obs.terminal(i) for i in ids)

        await obs.wait_for(check_new_accepted, what="every accepted and every answer")
        await obs.delete(CAM2, "DEPTH_B_C", {"request_id": "barrier"})
        await obs.outcome("barrier")  # events leave in order: nothing late is on its way
    assert checked == dict.fromkeys(ids, True)
    for request_id in ids:
        assert obs.states(request_id).count("accepted") == 1, request_id
        terminal = _terminals(obs, request_id)
        assert terminal, request_id
        assert all(e == terminal[0] for e in terminal), terminal  # a replay repeats it
    outcomes = sorted({e.state for i in ids for e in _terminals(obs, i)})
    print(f"grouped writes: sent={len(commands)} ids={len(ids)} outcomes={outcomes}")


def _yolo(confidence: float) -> dict[str, Any]:
    return {"type": "YOLO", "nn_config": {**YOLO["nn_config"], "confidence_threshold": confidence}}
