"""Bounded inbound: a flood of commands never loses an answer, whatever the queue sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest

from tests.harness import CAM1, CAM2, WAIT, YOLO, agent_and_observer, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

_STREAMS = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")


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
