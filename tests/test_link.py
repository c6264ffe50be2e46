"""The MQTT link against awkward brokers and neighbours: a second agent with our client id,
a broker that never answers an MQTT 5 CONNECT."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import run_broker
from tests.harness import WAIT, observe

if TYPE_CHECKING:
    from pathlib import Path

    from tests.agent_process import AgentProcess
    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

_TAKEOVER_WINDOW = 10.0  # seconds of the fault, once both agents reported it
_UNBOUNDED = (
    12  # connects of both agents in that window: 27 when the backoff reset every time, 2 now
)


def _connects(*agents: AgentProcess) -> int:
    return sum(len(a.logged("mqtt connected")) for a in agents)


async def test_two_agents_with_one_id_say_so_and_back_off(mqtt5: Broker, tmp_path: Path) -> None:
    agent_id = f"twin-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    topics = Topics.for_agent("oaktest", agent_id)
    configs = [
        write_config(
            tmp_path / f"agent{n}.toml",
            mqtt5,
            tmp_path / f"state{n}",
            agent_id,
            reconnect=(0.5, 8.0),
        )
        for n in (1, 2)
    ]
    async with observe(mqtt5, topics) as obs:
        with (
            agent_process(configs[0], tmp_path / "one.log") as one,
            agent_process(configs[1], tmp_path / "two.log") as two,
        ):

            def errors() -> list[Any]:
                found = [msgspec.json.decode(m.payload) for m in obs.on(topics.errors)]
                return [e for e in found if e["code"] == "session_taken_over"]

            # each agent reports it once it is back online, after being taken over
            await obs.wait_for(lambda: len(errors()) >= 2, 3 * WAIT, "both agents say so")
            assert all(f"agent.id {agent_id}" in e["message"] for e in errors())
            assert _said_so(one)
            assert _said_so(two)
            before = _connects(one, two)
            await anyio.sleep(_TAKEOVER_WINDOW)  # the fault goes on: count what it costs
            during = _connects(one, two) - before
            said = [len([x for x in a.log_lines() if _is_takeover(x)]) for a in (one, two)]
            print(f"session takeover: connects in {_TAKEOVER_WINDOW:g} s={during}, said={said}")
            assert during <= _UNBOUNDED
            # once per streak of short sessions, not once per reconnect
            assert all(1 <= n <= 2 for n in said), said


def _is_takeover(line: dict[str, object]) -> bool:
    return line.get("code") == "session_taken_over" and line.get("level") == "error"


def _said_so(agent: AgentProcess) -> bool:
    return any(_is_takeover(line) for line in agent.log_lines())


async def test_a_broker_that_ignores_an_mqtt5_connect_gets_3_1_1(tmp_path: Path) -> None:
    """amqtt never answers a v5 CONNECT carrying a will: the agent falls back, and says so once."""
    agent_id = f"fallback-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    topics = Topics.for_agent("oaktest", agent_id)
    with run_broker("amqtt", tmp_path / "amqtt") as amqtt:
        config = write_config(
            tmp_path / "agent.toml",
            amqtt,
            tmp_path / "state",
            agent_id,
            protocol="5",
            mqtt_extra="publish_timeout = 2.0",
        )
        async with observe(amqtt, topics) as obs:
            with agent_process(config, tmp_path / "agent.log") as agent:
                await obs.wait_for(
                    lambda: obs.latest(topics.availability) == b"online", 3 * WAIT, "online"
                )
                fallbacks = agent.logged(
                    "broker did not answer an MQTT 5 CONNECT, falling back to MQTT 3.1.1"
                )
                connected = agent.logged("mqtt connected")
                print(f"fallback: logged={len(fallbacks)} connected={connected}")
                assert len(fallbacks) == 1
                assert [c["protocol"] for c in connected] == ["3.1.1"]
