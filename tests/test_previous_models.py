"""Each stream's model before its current one stays in the store, so a rollback by sha256
works however long ago it was replaced; any other model nothing refers to is still pruned.

`[models] keep_unreferenced` is 2 s here. That a prune ran past the grace of the models
checked is shown by a probe: a model stored after them that nothing refers to (its deploy
is refused by pre-flight) is removed from the store; that prune would have removed the
older ones too, were they not kept. A Generic network on CAM2 publishes all along, so the
observer looks again at the store while the test waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from agent.config import ModelsSection
from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.harness import CAM1, CAM2, YOLO, agent_and_observer, make_config, observe, yolo
from tests.test_client import oak

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

MOBILENET = {"type": "MobileNet"}
WHERE = f"{CAM1}/CAM_A"


def _models(own_blobs: dict[str, Path]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Three models CAM_A can run, each with its nn_config."""
    return {
        "a": (own_blobs["yolo_tiny"].read_bytes(), YOLO),
        "b": (own_blobs["ssd_tiny"].read_bytes(), MOBILENET),
        "c": (own_blobs["yolo_tiny_c2"].read_bytes(), yolo(num_classes=2)),
    }


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _listed(obs: Observer) -> dict[str, Any]:
    """sha256 -> its entry of the latest `{base}/models`."""
    return {m["sha256"]: m for m in obs.latest_json(obs.topics.models) or []}


async def _deploy(obs: Observer, request_id: str, body: dict[str, Any]) -> None:
    await obs.deploy(CAM1, "CAM_A", {"request_id": request_id, **body}, encoding="msgpack")
    event = await obs.outcome(request_id)
    assert event.state == "succeeded", event


async def _ticking(obs: Observer, own_blobs: dict[str, Path]) -> str:
    """A Generic network on CAM2: its output wakes the observer's waits; its sha256."""
    blob = own_blobs["gray_tiny"].read_bytes()
    body = {"request_id": "ticker", "nn_config": {"type": "Generic"}, "model": blob}
    await obs.deploy(CAM2, "CAM_C", body, encoding="msgpack")
    assert (await obs.outcome("ticker")).state == "succeeded"
    await obs.wait_for(lambda: obs.detections(CAM2, "CAM_C"), what="ticker output")
    return _sha(blob)


async def _pruned_past_the_grace(obs: Observer, store: Path, blob: bytes, request_id: str) -> None:
    """Store a model nothing will refer to, and wait until a prune removed it."""
    probe = blob + os.urandom(1024)  # still parses; a sha256 of its own
    body = {"request_id": request_id, "nn_config": MOBILENET, "model": probe}
    await obs.deploy(CAM1, "CAM_B", body, encoding="msgpack")
    refused = await obs.outcome(request_id)
    assert refused.error is not None
    assert refused.error.code == "incompatible_model"
    path = store / f"{_sha(probe)}.blob"
    assert path.exists()  # stored before pre-flight refused its deploy (and within 2 s)
    await obs.wait_for(lambda: not path.exists(), what="probe pruned")


async def test_the_model_before_the_current_one_is_kept_and_no_other(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    models = _models(own_blobs)
    a, b, c = (_sha(blob) for blob, _ in models.values())
    store = tmp_path / "state" / "models"
    config = make_config(broker, tmp_path / "state")
    config = msgspec.structs.replace(config, models=ModelsSection(keep_unreferenced=2.0))
    async with agent_and_observer(broker, config) as (_, obs):
        ticker = await _ticking(obs, own_blobs)
        for name in ("a", "b"):
            blob, nn_config = models[name]
            await _deploy(obs, name, {"nn_config": nn_config, "model": blob})
        await obs.wait_for(lambda: _listed(obs).get(a, {}).get("previous_for") == [WHERE])
        await _pruned_past_the_grace(obs, store, models["a"][0], "probe")
        # a rollback naming only the sha256 of the model before: b becomes the one before
        await _deploy(obs, "back", {"nn_config": YOLO, "model_sha256": a})
        await obs.wait_for(lambda: _listed(obs).get(b, {}).get("previous_for") == [WHERE])
        assert _listed(obs)[b]["in_use_by"] == []
        # c replaces a: b is neither run nor the one before any more, and goes
        await _deploy(obs, "c", {"nn_config": models["c"][1], "model": models["c"][0]})
        await obs.wait_for(lambda: b not in _listed(obs), what="b pruned")
        assert {p.stem for p in store.glob("*.blob")} == {a, c, ticker}
        await obs.wait_for(lambda: _listed(obs)[a]["previous_for"] == [WHERE])
        body = {"request_id": "gone", "nn_config": MOBILENET, "model_sha256": b}
        await obs.deploy(CAM1, "CAM_A", body)
        gone = await obs.outcome("gone")
        assert (gone.state, gone.error and gone.error.code) == ("rejected", "model_not_found")
        # a delete keeps what it removed; what was kept before goes
        await obs.delete(CAM1, "CAM_A", {"request_id": "del"})
        assert (await obs.outcome("del")).state == "succeeded"
        await obs.wait_for(lambda: a not in _listed(obs), what="a pruned")
        assert _listed(obs)[c]["previous_for"] == [WHERE]
        await _deploy(obs, "undelete", {"nn_config": models["c"][1], "model_sha256": c})
    print("previous models: each stream's one before kept past the grace; a and b pruned")


async def test_the_model_before_survives_a_sigkill_and_restart(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    models = _models(own_blobs)
    a, b = _sha(models["a"][0]), _sha(models["b"][0])
    agent_id = f"prev-{os.getpid()}-{tmp_path.name[-6:]}"
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "agent.toml", broker, state, agent_id, extra="[models]\nkeep_unreferenced = 2\n"
    )
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(broker, topics) as obs:
        with agent_process(config, tmp_path / "agent.log") as first:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await _ticking(obs, own_blobs)
            for name in ("a", "b"):
                blob, nn_config = models[name]
                await _deploy(obs, name, {"nn_config": nn_config, "model": blob})
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        recorded = json.loads((state / "state.json").read_bytes())
        assert recorded["cameras"][CAM1]["previous"] == {"CAM_A": a}
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"offline", what="will")
        seen = len(obs.detections(CAM1, "CAM_A"))
        with agent_process(config, tmp_path / "restarted.log") as second:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online")
            await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_A")) > seen, what="b restored")
            await _pruned_past_the_grace(obs, state / "models", models["a"][0], "probe")
            await _deploy(obs, "back", {"nn_config": YOLO, "model_sha256": a})
            await obs.wait_for(lambda: _listed(obs).get(b, {}).get("previous_for") == [WHERE])
            restored = [
                line["previous"]
                for line in second.logged("camera state restored")
                if line["camera"] == CAM1
            ]
            assert restored == [["CAM_A"]]
            # as a user sees it
            listed = await oak("models", "--config", str(config))
            listed_json = await oak("models", "--config", str(config), "--json")
    assert listed.code == 0, listed
    header, *rows = listed.out.splitlines()
    assert header.split()[-5:] == ["in", "use", "by", "previous", "for"], header
    row = next(r for r in rows if r.startswith(b))
    assert row.split()[-2:] == ["-", WHERE], row  # b: no longer run, the one before
    entries = {e["sha256"]: e for e in json.loads(listed_json.out)}
    assert (entries[b]["in_use_by"], entries[b]["previous_for"]) == ([], [WHERE])
    assert (entries[a]["in_use_by"], entries[a]["previous_for"]) == ([WHERE], [])
