"""The state folder on disk: private, no torn leftovers, a model store that stays bounded."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from typing import TYPE_CHECKING

import pytest

from tests.harness import CAM1, YOLO, agent_and_observer, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fake_model(folder: Path, size: int, age: float) -> str:
    """A file in the store as an upload leaves it (`<sha256>.blob`), last used `age` s ago."""
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    path = folder / f"{sha}.blob"
    path.write_bytes(data)
    used = time.time() - age
    os.utime(path, (used, used))
    return sha


async def test_state_folder_is_private_and_torn_writes_are_removed(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    state = tmp_path / "state"
    models = state / "models"
    models.mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    models.chmod(0o755)
    torn_model = models / ".incoming-k2j3h4.tmp"
    torn_model.write_bytes(os.urandom(1024 * 1024))  # an upload a crash cut off
    torn_state = state / ".state-x8y9z0.tmp"
    torn_state.write_bytes(b'{"version": 1, "cam')
    fresh = tmp_path / "fresh" / "state"
    async with agent_and_observer(broker, make_config(broker, state)):
        assert not torn_model.exists()
        assert not torn_state.exists()
        assert (_mode(state), _mode(models)) == (0o700, 0o700)  # tightened
    blob = own_blobs["yolo_tiny"].read_bytes()
    async with agent_and_observer(broker, make_config(broker, fresh)) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", {"request_id": "d", "nn_config": YOLO, "model": blob})
        assert (await obs.outcome("d")).state == "succeeded"
    assert (_mode(fresh), _mode(fresh / "models")) == (0o700, 0o700)
    assert (fresh / "state.json").exists()
    print("disk: a torn 1 MiB upload and a torn state write removed at start-up; folders 0700")


async def test_unreferenced_models_are_pruned_and_bounded(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    blob = own_blobs["yolo_tiny"].read_bytes()
    used = hashlib.sha256(blob).hexdigest()
    state = tmp_path / "state"
    models = state / "models"
    async with agent_and_observer(broker, make_config(broker, state)) as (_, obs):
        await obs.deploy(CAM1, "CAM_A", {"request_id": "d", "nn_config": YOLO, "model": blob})
        assert (await obs.outcome("d")).state == "succeeded"
    os.utime(models / f"{used}.blob", (0, 0))  # referenced: kept however old
    stale = [_fake_model(models, 40 * 1024, age=3600) for _ in range(2)]
    # recent, unreferenced: kept newest first up to 4 x max_payload_bytes = 128 KiB
    recent = [_fake_model(models, 40 * 1024, age=50 - 10 * i) for i in range(5)]
    config = make_config(broker, state, max_payload_bytes=32 * 1024)
    async with agent_and_observer(broker, config) as (_, obs):
        left = {p.stem for p in models.glob("*.blob")}
        assert left == {used, *recent[-3:]}, (sorted(stale), sorted(recent))
        await obs.wait_for(lambda: obs.detections(CAM1, "CAM_A"))  # restored from the store
    print(
        f"disk: {len(stale) + 2} unreferenced models pruned at start-up "
        f"({len(stale)} past the grace period, 2 beyond the byte bound); "
        f"{len(left)} left, 1 of them referenced"
    )


async def test_uploads_refused_by_preflight_do_not_fill_the_store(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    """A model is stored before pre-flight refuses its command, and nothing ever refers to
    it: the store keeps at most 4 x max_payload_bytes of such models, newest first."""
    blob = own_blobs["yolo_tiny"].read_bytes()
    limit = 64 * 1024
    models = tmp_path / "state" / "models"
    config = make_config(broker, tmp_path / "state", max_payload_bytes=limit)
    size = 50 * 1024  # the blob padded with random bytes: parses, and a new sha256 each
    async with agent_and_observer(broker, config) as (_, obs):
        for n in range(8):
            model = blob + os.urandom(size - len(blob))
            body = {"request_id": f"u{n}", "nn_config": {"type": "MobileNet"}, "model": model}
            await obs.deploy(CAM1, "CAM_A", body, encoding="msgpack")
            refused = await obs.outcome(f"u{n}")
            assert refused.error is not None
            assert refused.error.code == "incompatible_model"
            stored = sum(p.stat().st_size for p in models.glob("*.blob"))
            assert stored <= max(4 * limit, size), (n, stored)
    left = len(list(models.glob("*.blob")))
    assert left == 4 * limit // size
    print(f"disk: 8 uploads of 50 KiB refused by pre-flight; {left} kept (bound 256 KiB)")
