"""Bounded inbound: a flood of commands never loses an answer, whatever the queue sizes."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from typing import TYPE_CHECKING

import anyio
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.state import StateDocument, StateFile, StoredRequest
from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import mosquitto_path, run_broker
from tests.harness import CAM1, CAM2, WAIT, YOLO, agent_and_observer, make_config, observe

if TYPE_CHECKING:
    from pathlib import Path

    from tests.agent_process import AgentProcess
    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

_STREAMS = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")
_POLL_SECONDS = 0.05
_SILENT = "no acknowledgement and nothing else from the broker"


async def test_a_flood_of_commands_past_the_event_queue_answers_every_one_once(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    config = make_config(broker, tmp_path, event_queue_size=16)
    ids = [f"flood-{i}" for i in range(400)]
    async with agent_and_observer(broker, config) as (app, obs):
        send = anyio.Semaphore(32)  # many publishes in flight: the broker sends them on at once

        async def publish(i: int, request_id: str) -> None:
            async with send:
                camera, stream = (CAM1, CAM2)[i % 2], _STREAMS[(i // 2) % 4]
                if i % 4 == 3:
                    await obs.delete(camera, stream, {"request_id": request_id})
                else:
                    body = {"request_id": request_id, "nn_config": YOLO, "model": blob}
                    await obs.deploy(camera, stream, body, encoding="msgpack")

        async with anyio.create_task_group() as tg:
            for i, request_id in enumerate(ids):
                tg.start_soon(publish, i, request_id)
        try:
            await obs.wait_for(lambda: all(obs.terminal(i) for i in ids), 3 * WAIT)
        except TimeoutError:
            missing = [i for i in ids if not obs.terminal(i)]
            pytest.fail(
                f"{len(missing)} of {len(ids)} never answered "
                f"(events dropped: {app.link.stats.events_dropped}): {missing[:10]}"
            )
        terminal = {i: [e.state for e in obs.events(i) if e.terminal] for i in ids}
    twice = {i: states for i, states in terminal.items() if len(states) != 1}
    assert not twice, twice
    assert app.link.stats.events_dropped == 0


def _went_silent(agent: AgentProcess) -> bool:
    reconnects = agent.logged("mqtt disconnected, reconnecting")
    return any(_SILENT in str(line.get("error")) for line in reconnects)


@pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (stopped with SIGSTOP)")
async def test_a_broker_gone_silent_while_an_answer_waits_ends_the_connection(
    tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """PUBACKs have no deadline of their own any more: the watchdog still finds a dead broker."""
    blob = own_blobs["yolo_tiny"].read_bytes()
    agent_id = f"silent-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    topics = Topics.for_agent("oaktest", agent_id)
    with run_broker("mosquitto", tmp_path / "broker") as broker:
        config = write_config(
            tmp_path / "agent.toml",
            broker,
            tmp_path / "state",
            agent_id,
            boot_seconds=1.5,  # its `succeeded` comes once the broker is stopped
            mqtt_extra="publish_timeout = 1.0",
        )
        async with observe(broker, topics) as obs:
            with agent_process(config, tmp_path / "agent.log") as agent:
                await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
                body = {"request_id": "late", "nn_config": YOLO, "model": blob}
                await obs.deploy(CAM1, "CAM_A", body, encoding="msgpack")
                await obs.wait_for(lambda: "applying" in obs.states("late"))
                os.kill(broker.pid, signal.SIGSTOP)
                try:
                    for _ in range(round(WAIT / _POLL_SECONDS)):  # the log file has no event
                        if _went_silent(agent):
                            break
                        await anyio.sleep(_POLL_SECONDS)
                finally:
                    os.kill(broker.pid, signal.SIGCONT)
                assert _went_silent(agent), "the link never gave up on the silent broker"
                # the answer was kept, and goes out on the next connection
                await obs.outcome("late", 2 * WAIT)
                assert [e.state for e in obs.events("late") if e.terminal] == ["succeeded"]


async def test_a_redelivered_command_answered_interrupted_at_start_is_answered_once(
    mqtt5: Broker, tmp_path: Path
) -> None:
    """The flake of stop 17, made to happen: killed after the write that recorded a command
    and before its PUBACK, the agent answers it `interrupted` from the state file at start,
    and the broker then sends the command again (DUP): that copy is not answered again."""
    config = make_config(mqtt5, tmp_path / "state")
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    command = topics.command(CAM1, "CAM_A", "delete")
    # what the killed agent left: the request recorded as unfinished ...
    recorded = StateDocument(in_flight=(StoredRequest("dup-1", "delete", CAM1, "CAM_A"),))
    config.state_path.mkdir()
    await StateFile(config.state_path).save(lambda: recorded)
    # ... and its session at the broker, holding the command it never acknowledged
    await anyio.to_thread.run_sync(_leave_unacknowledged, mqtt5, config.client_id, topics, command)
    async with agent_and_observer(mqtt5, config) as (_, obs):
        await obs.outcome("dup-1")
        # events leave in order: once a later command is answered, no second answer is coming
        await obs.delete(CAM2, "CAM_A", {"request_id": "barrier"})
        await obs.outcome("barrier")
        answers = [(e.state, e.error.code if e.error else None) for e in obs.events("dup-1")]
    assert answers == [("failed", "interrupted")]


def _leave_unacknowledged(broker: Broker, client_id: str, topics: Topics, command: str) -> None:
    """Receive `command` in the agent's persistent session and leave without a PUBACK."""
    received = threading.Event()
    session = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    session.manual_ack_set(True)
    session.on_message = lambda *_: received.set()
    connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    connect.SessionExpiryInterval = 300
    session.connect(broker.host, broker.port, clean_start=True, properties=connect)
    session.loop_start()
    try:
        subscribed = threading.Event()
        session.on_subscribe = lambda *_: subscribed.set()
        session.subscribe([(f, SubscribeOptions(qos=1)) for f in topics.command_filters])
        assert subscribed.wait(WAIT), "no SUBACK"
        sender = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        try:
            sender.publish(command, b'{"request_id": "dup-1"}', qos=1).wait_for_publish(WAIT)
        finally:
            sender.loop_stop()
            sender.disconnect()
        assert received.wait(WAIT), "the session never got the command"
    finally:
        session.disconnect()  # the session and its unacknowledged command stay
        session.loop_stop()
