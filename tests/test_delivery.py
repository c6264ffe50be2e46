"""Every command the broker acknowledged gets exactly one final answer, whatever the signal.

The agent acknowledges a command only once it has handled it (recorded it, or queued its
answer and the broker has that answer) or refused it; a command it received but did not
get to is left unacknowledged and the broker sends it again on the next connect.
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.harness import CAM1, CAM2, WAIT, YOLO, observe

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

_STREAMS = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")
_ALLOWED = {
    ("succeeded", None),
    ("superseded", None),
    ("failed", "interrupted"),
    ("rejected", "shutting_down"),
}


def _agent_id(tag: str) -> str:
    return f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def _answered_once(obs: Observer, ids: list[str], scenario: str) -> dict[str, Any]:
    """Wait for every answer, then a barrier command; return each id's one terminal outcome."""
    try:
        await obs.wait_for(lambda: all(obs.terminal(i) for i in ids), 2 * WAIT)
    except TimeoutError:
        missing = {i: obs.states(i) for i in ids if not obs.terminal(i)}
        pytest.fail(f"{scenario}: {len(missing)} of {len(ids)} never answered: {missing}")
    # events leave in order: once the barrier is answered, no late second answer is on its way
    await obs.delete(CAM2, "CAM_A", {"request_id": f"barrier-{uuid.uuid4().hex[:6]}"})
    await obs.wait_for(
        lambda: any(e.request_id.startswith("barrier-") and e.terminal for e in obs.events())
    )
    terminal = {i: [e for e in obs.events(i) if e.terminal] for i in ids}
    outcomes = {
        i: (t[0].state, t[0].error.code if t[0].error else None) for i, t in terminal.items()
    }
    counts: dict[tuple[str, str | None], int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"{scenario}: sent={len(ids)} answered={len(outcomes)} outcomes={counts}")
    twice = {i: [e.state for e in t] for i, t in terminal.items() if len(t) != 1}
    assert not twice, f"answered more than once: {twice}"
    assert set(outcomes.values()) <= _ALLOWED, outcomes
    return outcomes


async def test_sigterm_during_a_storm_answers_every_acknowledged_command_once(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    agent_id = _agent_id("storm")
    config = write_config(tmp_path / "agent.toml", broker, tmp_path / "state", agent_id)
    topics = Topics.for_agent("oaktest", agent_id)
    ids = [f"storm-{i}" for i in range(300)]
    async with observe(broker, topics) as obs:
        with agent_process(config, tmp_path / "first.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            for i, request_id in enumerate(ids):
                if i == len(ids) // 2:
                    first.signal(signal.SIGTERM)  # the rest arrive while it shuts down
                body = {"request_id": request_id, "nn_config": YOLO, "model": blob}
                # awaited: the broker has acknowledged the command
                await obs.deploy((CAM1, CAM2)[i % 2], _STREAMS[i % 4], body, encoding="msgpack")
            assert await anyio.to_thread.run_sync(first.wait) == 0
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline")
        with agent_process(config, tmp_path / "second.log"):
            await _answered_once(obs, ids, "SIGTERM mid-storm")


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.2, 0.3])
async def test_sigkill_after_a_large_deploy_was_acknowledged_answers_it_once(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path], delay: float
) -> None:
    # a real blob followed by random bytes: depthai parses it like the original
    padding = random.Random(7).randbytes(25 * 1024 * 1024)  # noqa: S311  # filler, not a secret
    blob = own_blobs["yolo_tiny"].read_bytes() + padding
    agent_id = _agent_id("kill")
    config = write_config(tmp_path / "agent.toml", broker, tmp_path / "state", agent_id)
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(broker, topics) as obs:
        with agent_process(config, tmp_path / "first.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            body = {"request_id": "large", "nn_config": YOLO, "model": blob}
            await obs.deploy(CAM1, "CAM_A", body, encoding="msgpack")  # the broker has it
            await anyio.sleep(delay)  # the fault: a kill at some point of the handling
            first.signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(first.wait)
        seen_before = [e.state for e in obs.events("large")]
        with agent_process(config, tmp_path / "second.log"):
            outcomes = await _answered_once(
                obs, ["large"], f"SIGKILL {delay} s after a 25 MB deploy"
            )
        print(f"events before the kill: {seen_before}")
        assert outcomes["large"] in {("succeeded", None), ("failed", "interrupted")}
