"""The command intake: one camera's commands keep their arrival order, whatever their size,
while other cameras' commands are handled beside them."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from tests.harness import CAM1, CAM2, YOLO, agent_and_observer, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

_PADDING = 20 * 1024 * 1024


def _large(blob: bytes, seed: int) -> bytes:
    # a real blob followed by random bytes: depthai parses it like the original
    return blob + random.Random(seed).randbytes(_PADDING)  # noqa: S311  # filler, not a secret


def _first(obs: Observer, request_id: str, state: str) -> int:
    """Where the first `state` event of `request_id` is among all events seen, in order."""
    return next(
        i for i, e in enumerate(obs.events()) if e.request_id == request_id and e.state == state
    )


async def test_one_cameras_rejections_keep_their_order_behind_a_large_model(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (_, obs):
        # found wrong only once 20 MB are hashed; the two after it are wrong at a glance
        wrong_sha = {"request_id": "a1", "nn_config": YOLO, "model": _large(blob, 1)}
        wrong_sha["model_sha256"] = "0" * 64
        await obs.deploy(CAM1, "CAM_A", wrong_sha, encoding="msgpack")
        await obs.deploy(CAM1, "CAM_B", {"request_id": "a2", "nn_config": {"type": "SSD"}})
        await obs.delete(CAM1, "CAM_C", {"request_id": "a3", "expires_at": 1.0})
        await obs.delete(CAM2, "CAM_C", {"request_id": "b1"})  # another camera, beside them
        outcomes = {i: await obs.outcome(i) for i in ("a1", "a2", "a3", "b1")}
    codes = {i: (e.state, e.error.code if e.error else None) for i, e in outcomes.items()}
    assert codes == {
        "a1": ("rejected", "checksum_mismatch"),
        "a2": ("rejected", "invalid_payload"),
        "a3": ("rejected", "expired"),
        "b1": ("succeeded", None),
    }
    order = [_first(obs, i, "rejected") for i in ("a1", "a2", "a3")]
    assert order == sorted(order), [e.request_id for e in obs.events()]


async def test_a_delete_behind_a_large_deploy_on_its_stream_does_not_overtake_it(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    config = make_config(broker, tmp_path)
    async with agent_and_observer(broker, config) as (app, obs):
        body = {"request_id": "big", "nn_config": YOLO, "model": _large(blob, 2)}
        await obs.deploy(CAM1, "CAM_A", body, encoding="msgpack")
        await obs.delete(CAM1, "CAM_A", {"request_id": "gone"})
        big, gone = await obs.outcome("big"), await obs.outcome("gone")
        assert big.state in {"succeeded", "superseded"}, big
        assert gone.state == "succeeded", gone
        assert _first(obs, "big", "accepted") < _first(obs, "gone", "accepted")
        assert "CAM_A" not in app.coordinator.workers[CAM1].running  # the delete came last
