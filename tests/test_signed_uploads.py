"""Signed upload manifests: the real agent on mosquitto (MQTT 5 user properties) and on
amqtt (MQTT 3.1.1, the envelope), driven over MQTT; the client as a user runs it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from anyio.from_thread import start_blocking_portal
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import SecurityKey, SecuritySection
from agent.signing import envelope, public_key_text, sign
from tests.brokers import Broker, run_broker
from tests.harness import CAM1, WAIT, agent_and_observer, make_config
from tests.strategies import envelopes, user_properties

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.app import App
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SSD = ROOT / "tests" / "data" / "blobs" / "ssd_tiny.blob"
CHUNK = 4096
OPS = Ed25519PrivateKey.generate()  # may command every camera: may sign manifests
CAM1_ONLY = Ed25519PrivateKey.generate()  # may command CAM1 only: may not
STRANGER = Ed25519PrivateKey.generate()  # nobody trusts it
OAK = [sys.executable, "-m", "agent.cli"]


def security(*, require: bool = True) -> SecuritySection:
    return SecuritySection(
        require_signed=require,
        keys=(
            SecurityKey(id="ops", public_key=public_key_text(OPS.public_key())),
            SecurityKey(
                id="cam1", public_key=public_key_text(CAM1_ONLY.public_key()), cameras=(CAM1,)
            ),
        ),
    )


def other_data(tag: str) -> bytes:
    """Bytes of their own sha256 (never stored: only their manifests are sent)."""
    return SSD.read_bytes() + tag.encode()


def manifest(data: bytes, **extra: Any) -> bytes:
    return msgspec.json.encode({"size": len(data), "chunk_size": CHUNK, **extra})


def signed(
    topic: str,
    payload: bytes,
    key: Ed25519PrivateKey = OPS,
    key_id: str = "ops",
    *,
    as_envelope: bool = False,
) -> tuple[bytes, Properties | None]:
    signature = sign(key, topic, payload)
    if as_envelope:
        return envelope(payload, key_id, signature), None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [
        ("oak-key-id", key_id),
        ("oak-signature", base64.b64encode(signature).decode()),
    ]
    return payload, properties


def status(obs: Observer, sha256: str) -> dict[str, Any] | None:
    payload = obs.latest(obs.topics.upload_status(sha256))
    return msgspec.json.decode(payload) if payload else None


async def until_state(obs: Observer, sha256: str, state: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        current = status(obs, sha256)
        return current if current is not None and current["state"] == state else None

    return await obs.wait_for(found, what=f"upload {sha256[:8]} {state}")


async def refused(
    obs: Observer, data: bytes, message: tuple[bytes, Properties | None]
) -> dict[str, Any]:
    """Publish a manifest for `data`; its `failed` status's error."""
    sha = hashlib.sha256(data).hexdigest()
    await obs.send(obs.topics.upload(sha), message[0], properties=message[1])
    failed = await until_state(obs, sha, "failed")
    assert failed["error"] is not None
    return dict(failed["error"])


def soon(seconds: float = 60.0) -> float:
    return time.time() + seconds


async def test_require_signed_refuses_unsigned_and_badly_signed_manifests(
    mqtt5: Broker, tmp_path: Path
) -> None:
    config = make_config(mqtt5, tmp_path / "state", security=security())
    async with agent_and_observer(mqtt5, config) as (app, obs):
        up = obs.topics.upload

        def topic(tag: str) -> str:
            return up(hashlib.sha256(other_data(tag)).hexdigest())

        data = other_data("unsigned")
        error = await refused(obs, data, (manifest(data, expires_at=soon()), None))
        assert error["code"] == "unauthorized"
        assert "unsigned manifest" in error["message"]
        # a chunk of a refused upload is not taken (dropped as a late copy of an upload that
        # ended); the uploads are handled in arrival order, so once the next manifest is
        # answered the chunk was handled
        sha = hashlib.sha256(data).hexdigest()
        await obs.send(obs.topics.chunk(sha, 0), data[:CHUNK])
        after = other_data("after-the-chunk")
        assert (await refused(obs, after, (manifest(after), None)))["code"] == "unauthorized"
        assert not list((tmp_path / "state" / "uploads").glob("*.part"))
        current = status(obs, sha)
        assert current is not None
        assert (current["state"], current["error"]["code"]) == ("failed", "unauthorized")

        data = other_data("stranger")
        body = manifest(data, expires_at=soon())
        error = await refused(obs, data, signed(topic("stranger"), body, STRANGER, "ops"))
        assert error["code"] == "bad_signature"
        assert "does not verify with key ops" in error["message"]

        data = other_data("unknown")
        body = manifest(data, expires_at=soon())
        error = await refused(obs, data, signed(topic("unknown"), body, STRANGER, "nobody"))
        assert error["code"] == "unauthorized"
        assert "nobody" in error["message"]

        data = other_data("cam1")
        body = manifest(data, expires_at=soon())
        error = await refused(obs, data, signed(topic("cam1"), body, CAM1_ONLY, "cam1"))
        assert error["code"] == "unauthorized"
        assert 'cameras = ["*"]' in error["message"]

        data = other_data("moved")  # signed for another sha256's topic
        body = manifest(data, expires_at=soon())
        error = await refused(obs, data, signed(topic("elsewhere"), body))
        assert error["code"] == "bad_signature"
        assert not list((tmp_path / "state" / "uploads").glob("*.manifest"))  # nothing kept
        assert app.link.stats.connects == 1


async def test_a_signed_manifest_needs_expires_at_and_then_is_taken(
    mqtt5: Broker, tmp_path: Path
) -> None:
    config = make_config(mqtt5, tmp_path / "state", security=security())
    async with agent_and_observer(mqtt5, config) as (app, obs):
        up = obs.topics.upload

        def topic(tag: str) -> str:
            return up(hashlib.sha256(other_data(tag)).hexdigest())

        data = other_data("no-expiry")
        error = await refused(obs, data, signed(topic("no-expiry"), manifest(data)))
        assert error["code"] == "invalid_payload"
        assert "expires_at" in error["message"]

        data = other_data("far")
        body = manifest(data, expires_at=soon(3600))
        error = await refused(obs, data, signed(topic("far"), body))
        assert error["code"] == "invalid_payload"
        assert "expires_at" in error["message"]
        assert "max_command_age" in error["message"]

        assert not list((tmp_path / "state" / "uploads").glob("*.manifest"))  # nothing kept

        # a signed manifest is taken; its chunks, unsigned, are covered by its sha256
        data = SSD.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        payload, properties = signed(up(sha), manifest(data, expires_at=soon()))
        await obs.send(up(sha), payload, properties=properties)
        await until_state(obs, sha, "receiving")
        for offset in range(0, len(data), CHUNK):
            await obs.send(obs.topics.chunk(sha, offset), data[offset : offset + CHUNK])
        stored = await until_state(obs, sha, "stored")
        assert stored["received"] == len(data)
        assert app.link.stats.connects == 1


async def test_a_signature_is_checked_even_when_signing_is_optional(
    mqtt5: Broker, tmp_path: Path
) -> None:
    config = make_config(mqtt5, tmp_path / "state", security=security(require=False))
    async with agent_and_observer(mqtt5, config) as (_, obs):
        data = other_data("optional")
        sha = hashlib.sha256(data).hexdigest()
        body = manifest(data, expires_at=soon())
        error = await refused(obs, data, signed(obs.topics.upload(sha), body, STRANGER))
        assert error["code"] == "bad_signature"
        data = other_data("plain")  # unsigned: as before
        sha = hashlib.sha256(data).hexdigest()
        await obs.send(obs.topics.upload(sha), manifest(data))
        await until_state(obs, sha, "receiving")


@pytest.fixture(scope="module")
def amqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_broker("amqtt", tmp_path_factory.mktemp("amqtt")) as broker:
        yield broker


async def test_the_envelope_carries_a_manifest_through_amqtt(amqtt: Broker, tmp_path: Path) -> None:
    config = make_config(amqtt, tmp_path / "state", security=security())
    async with agent_and_observer(amqtt, config) as (app, obs):
        assert app.link.protocol == "3.1.1"
        data = other_data("wrong-envelope")
        sha = hashlib.sha256(data).hexdigest()
        body = manifest(data, expires_at=soon())
        message = signed(obs.topics.upload(sha), body, STRANGER, as_envelope=True)
        error = await refused(obs, data, message)
        assert error["code"] == "bad_signature"
        assert "(envelope)" in error["message"]
        data = SSD.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        topic = obs.topics.upload(sha)
        await obs.send(topic, signed(topic, manifest(data, expires_at=soon()), as_envelope=True)[0])
        await until_state(obs, sha, "receiving")
        for offset in range(0, len(data), CHUNK):
            await obs.send(obs.topics.chunk(sha, offset), data[offset : offset + CHUNK])
        await until_state(obs, sha, "stored")


# --- the client, as a user runs it ---------------------------------------------------------


async def oak(*args: str, timeout: float = WAIT) -> tuple[int, str, str]:
    with anyio.fail_after(timeout):
        done = await anyio.run_process([*OAK, *args], check=False, cwd=ROOT)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def broker_flags(broker: Broker, agent_id: str) -> list[str]:
    port = str(broker.port)
    return ["--host", "127.0.0.1", "--port", port, "--prefix", "oaktest", "--agent", agent_id]


def key_file(folder: Path) -> Path:
    path = folder / "ops.key"
    pem = OPS.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
async def test_signed_upload_and_deploy_with_the_client(
    kind: str, broker: Broker, amqtt: Broker, tmp_path: Path
) -> None:
    if kind == "mosquitto" and broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    where = broker if kind == "mosquitto" else amqtt
    config = make_config(where, tmp_path / "state", security=security())
    key = key_file(tmp_path)
    async with agent_and_observer(where, config) as (_, obs):
        flags = broker_flags(where, config.agent.id)
        # unsigned: refused, nothing stored
        code, out, err = await oak("upload", *flags, "--model", str(SSD), "--chunk-size", "4096")
        assert code == 1, (out, err)
        assert "(unauthorized)" in err, err
        sha = hashlib.sha256(SSD.read_bytes()).hexdigest()
        assert not (tmp_path / "state" / "models" / f"{sha}.blob").exists()
        # signed: stored
        code, out, err = await oak(
            "upload", *flags, "--model", str(SSD), "--chunk-size", "4096", "--sign-key", str(key)
        )
        assert code == 0, (out, err)
        assert json.loads(out)["state"] == "stored"
        assert (tmp_path / "state" / "models" / f"{sha}.blob").read_bytes() == SSD.read_bytes()
        target = ("--camera", CAM1, "--stream", "CAM_A", "--nn-config", '{"type": "MobileNet"}')
        code, out, err = await oak(
            "deploy", *flags, *target, "--model-sha256", sha, "--sign-key", str(key)
        )
        assert code == 0, (out, err)
        assert json.loads(out.splitlines()[-1])["state"] == "succeeded"
        uploads = [m for m in obs.messages if m.topic == obs.topics.upload(sha)]
    carried = [bool(m.properties and getattr(m.properties, "UserProperty", None)) for m in uploads]
    signed_ones = uploads[-1:]
    if kind == "mosquitto":
        assert carried[0] is False
        assert carried[-1] is True  # user properties on MQTT 5
    else:
        assert not any(carried)
        assert signed_ones[0].payload.startswith(b"\x83")  # in the envelope


async def test_signed_deploy_of_a_large_model_sends_signed_chunks(
    mqtt5: Broker, tmp_path: Path
) -> None:
    """`deploy --sign-key` with a model above the packet limit: the manifest it uploads
    first is signed too, then the deploy by sha256."""
    config = make_config(mqtt5, tmp_path / "state", security=security())
    key = key_file(tmp_path)
    async with agent_and_observer(mqtt5, config) as (_, obs):
        flags = [*broker_flags(mqtt5, config.agent.id), "--camera", CAM1, "--stream", "CAM_A"]
        code, out, err = await oak(
            "deploy",
            *flags,
            "--model",
            str(SSD),
            "--nn-config",
            '{"type": "MobileNet"}',
            "--max-packet",
            "8192",
            "--sign-key",
            str(key),
        )
        assert code == 0, (out, err)
        assert "in chunks first" in err
        assert json.loads(out.splitlines()[-1])["state"] == "succeeded"
        sha = hashlib.sha256(SSD.read_bytes()).hexdigest()
        uploads = [m for m in obs.messages if m.topic == obs.topics.upload(sha)]
        assert uploads
        assert all(getattr(m.properties, "UserProperty", None) for m in uploads)


# --- arbitrary properties on the upload topic ------------------------------------------------


@given(payload=st.binary(max_size=300) | envelopes, properties=user_properties)
@example(payload=b"{}", properties=[("oak-key-id", "ops"), ("oak-signature", "x")])
@example(payload=b'{"size": 5000, "chunk_size": 4096}', properties=[("oak-key-id", "ops")] * 2)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_arbitrary_properties_on_a_manifest_are_answered(
    live: tuple[Any, App, Observer], payload: bytes, properties: list[tuple[str, str]]
) -> None:
    portal, app, obs = live
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    props = None
    if properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = properties
    connects = app.link.stats.connects

    async def publish_and_wait() -> dict[str, Any]:
        await obs.send(obs.topics.upload(sha), payload, properties=props)
        return await until_state(obs, sha, "failed")

    failed = portal.call(publish_and_wait)
    assert failed["error"]["code"] in ("unauthorized", "bad_signature", "invalid_payload"), failed
    assert app.link.stats.connects == connects  # the connection was never dropped
    assert app.uploads is not None
    assert not list(app.uploads.folder.glob("*.manifest"))


@pytest.fixture(scope="module")
def live(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, App, Observer]]:
    """One agent requiring signatures for every example, in a portal's event loop."""
    if not broker.mqtt5:
        pytest.skip("user properties need an MQTT 5 broker (mosquitto)")
    config = make_config(broker, tmp_path_factory.mktemp("fuzz-manifests"), security=security())
    with start_blocking_portal("asyncio") as portal, contextlib.ExitStack() as stack:
        app, observer = stack.enter_context(
            portal.wrap_async_context_manager(agent_and_observer(broker, config))
        )
        yield portal, app, observer
