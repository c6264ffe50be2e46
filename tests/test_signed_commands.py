"""Signed commands end to end: the real agent on mosquitto (MQTT 5 user properties) and on
amqtt (MQTT 3.1.1, the envelope), driven over MQTT; the client as a user runs it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from anyio.from_thread import start_blocking_portal
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import SecurityKey, SecuritySection
from agent.signing import Authenticity, envelope, public_key_text, sign
from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import Broker, free_port, run_broker
from tests.harness import CAM1, CAM2, WAIT, agent_and_observer, make_config, observe
from tests.strategies import envelopes, user_properties

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from agent.app import App
    from agent.messages import Event
    from tests.harness import Observer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SSD = ROOT / "tests" / "data" / "blobs" / "ssd_tiny.blob"
BLOB = base64.b64encode(SSD.read_bytes()).decode()
OPS = Ed25519PrivateKey.generate()  # may command every camera
CAM1_ONLY = Ed25519PrivateKey.generate()  # may command CAM1 only
STRANGER = Ed25519PrivateKey.generate()  # nobody trusts it
OAK = [sys.executable, "-m", "agent.cli"]


def security(*, require: bool = True, **options: Any) -> SecuritySection:
    return SecuritySection(
        require_signed=require,
        keys=(
            SecurityKey(id="ops", public_key=public_key_text(OPS.public_key())),
            SecurityKey(
                id="cam1", public_key=public_key_text(CAM1_ONLY.public_key()), cameras=(CAM1,)
            ),
        ),
        **options,
    )


@pytest.fixture(scope="module")
def amqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_broker("amqtt", tmp_path_factory.mktemp("amqtt")) as broker:
        yield broker


def _rid() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def deploy_body(request_id: str | None = None, expires_in: float | None = 60.0) -> dict[str, Any]:
    body: dict[str, Any] = {"nn_config": {"type": "MobileNet"}, "model": BLOB}
    if request_id is not None:
        body["request_id"] = request_id
    if expires_in is not None:
        body["expires_at"] = time.time() + expires_in
    return body


def delete_body(request_id: str, expires_in: float = 60.0) -> dict[str, Any]:
    return {"request_id": request_id, "expires_at": time.time() + expires_in}


def signed(
    topic: str,
    body: dict[str, Any] | bytes,
    key: Ed25519PrivateKey = OPS,
    key_id: str = "ops",
    *,
    sign_for: str | None = None,
    as_envelope: bool = False,
) -> tuple[bytes, Properties | None]:
    """A command's payload and properties, signed for `sign_for` (default: `topic`)."""
    payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
    signature = sign(key, sign_for or topic, payload)
    if as_envelope:
        return envelope(payload, key_id, signature), None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [
        ("oak-key-id", key_id),
        ("oak-signature", base64.b64encode(signature).decode()),
    ]
    return payload, properties


async def publish(obs: Observer, topic: str, message: tuple[bytes, Properties | None]) -> None:
    await obs.send(topic, message[0], properties=message[1])


async def answer(
    obs: Observer, topic: str, payload: bytes, properties: Properties | None = None
) -> Event:
    """Publish one command and return its final answer (the next terminal event)."""
    before = len([e for e in obs.events() if e.terminal])
    await obs.send(topic, payload, properties=properties)
    await obs.wait_for(
        lambda: len([e for e in obs.events() if e.terminal]) > before, what="an answer"
    )
    return [e for e in obs.events() if e.terminal][before]


def code(event: Event) -> str | None:
    return event.error.code if event.error else None


@contextlib.asynccontextmanager
async def signed_agent(
    broker: Broker, tmp_path: Path, section: SecuritySection
) -> AsyncIterator[tuple[App, Observer]]:
    config = make_config(broker, tmp_path / "state", security=section)
    async with agent_and_observer(broker, config) as (app, obs):
        yield app, obs


# --- MQTT 5: user properties ---------------------------------------------------------------


async def test_signed_unsigned_wrong_key_and_moved_commands(mqtt5: Broker, tmp_path: Path) -> None:
    async with signed_agent(mqtt5, tmp_path, security()) as (app, obs):
        topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        rid = _rid()
        event = await answer(obs, topic, *signed(topic, deploy_body(rid)))
        assert (event.request_id, event.state, event.error) == (rid, "succeeded", None)
        request = app.coordinator.requests.get(rid, CAM1)
        assert request is not None
        assert request.authenticity == Authenticity(signed=True, key_id="ops")

        unsigned = await answer(obs, topic, msgspec.json.encode(deploy_body("u1")))
        assert (unsigned.request_id, unsigned.state, code(unsigned)) == (
            "u1",
            "rejected",
            "unauthorized",
        )
        assert unsigned.error is not None
        assert "unsigned command" in unsigned.error.message

        wrong = await answer(obs, topic, *signed(topic, deploy_body("w1"), STRANGER))
        assert (wrong.request_id, code(wrong)) == ("w1", "bad_signature")
        assert wrong.error is not None
        assert "does not verify with key ops" in wrong.error.message

        # a valid signature for CAM1's topic, published to CAM2's
        cam2 = obs.topics.command(CAM2, "CAM_A", "deploy")
        moved = await answer(obs, cam2, *signed(cam2, deploy_body("m1"), sign_for=topic))
        assert (moved.request_id, moved.camera, code(moved)) == ("m1", CAM2, "bad_signature")

        # a key for CAM1 only, correctly signed for CAM2
        narrow = await answer(obs, cam2, *signed(cam2, deploy_body("n1"), CAM1_ONLY, "cam1"))
        assert (narrow.request_id, code(narrow)) == ("n1", "unauthorized")
        assert narrow.error is not None
        assert f"key cam1 may not command camera '{CAM2}'" in narrow.error.message
        # ... and on CAM1 it may
        ok = await answer(obs, topic, *signed(topic, deploy_body("n2"), CAM1_ONLY, "cam1"))
        assert (ok.request_id, ok.state) == ("n2", "succeeded")

        # over 1 MiB (an unknown field as padding): verified in a thread
        padded = {**deploy_body("big1"), "padding": "x" * 1_500_000}
        big = await answer(obs, topic, *signed(topic, padded))
        assert (big.request_id, big.state) == ("big1", "succeeded")
        padded = {**deploy_body("big2"), "padding": "x" * 1_500_000}
        big = await answer(obs, topic, *signed(topic, padded, STRANGER))
        assert (big.request_id, code(big)) == ("big2", "bad_signature")

        stranger = await answer(obs, topic, *signed(topic, deploy_body("k1"), STRANGER, "who"))
        assert (stranger.request_id, code(stranger)) == ("k1", "unauthorized")
        assert stranger.error is not None
        assert "key id 'who'" in stranger.error.message
    # nothing the senders did restarted a camera but the two signed deploys
    assert app.coordinator.workers[CAM2].restarts == 0


async def test_signed_commands_name_the_missing_or_too_distant_field(
    mqtt5: Broker, tmp_path: Path
) -> None:
    async with signed_agent(mqtt5, tmp_path, security(max_command_age=120)) as (_, obs):
        topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        cases = [
            (deploy_body(None), "$.request_id"),
            (deploy_body("e1", expires_in=None), "$.expires_at"),
            (deploy_body("e2", expires_in=125), "$.expires_at"),
        ]
        for body, path in cases:
            event = await answer(obs, topic, *signed(topic, body))
            assert (event.state, code(event)) == ("rejected", "invalid_payload"), event
            assert event.error is not None
            assert event.error.message.endswith(f"- at `{path}`")
        assert "at most 120 s" in str(obs.terminal("e2"))
        delete = obs.topics.command(CAM1, "CAM_A", "delete")
        event = await answer(obs, delete, *signed(delete, b""))  # an empty delete, signed
        assert event.error is not None
        assert event.error.message.endswith("- at `$.request_id`")


async def test_a_replay_never_runs_again_after_300_requests_nor_after_a_restart(
    mqtt5: Broker, tmp_path: Path
) -> None:
    config = make_config(mqtt5, tmp_path / "state", security=security())
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id)
    topic = topics.command(CAM1, "CAM_A", "deploy")
    rid = _rid()
    original = signed(topic, deploy_body(rid, expires_in=240))
    async with agent_and_observer(mqtt5, config) as (app, obs):
        event = await answer(obs, topic, *original)
        assert event.state == "succeeded"
        restarts = app.coordinator.workers[CAM1].restarts
        delete = topics.command(CAM2, "CAM_B", "delete")
        for i in range(300):  # deletes of nothing: answered without a restart
            await publish(obs, delete, signed(delete, delete_body(f"other-{i}")))
        await obs.wait_for(lambda: obs.terminal("other-299"), what="300 answers")
        assert app.coordinator.requests.get("other-0", CAM2) is not None  # signed: still kept
        replayed = await answer(obs, topic, *original)
        assert (replayed.request_id, replayed.state) == (rid, "succeeded")
        assert obs.states(rid).count("accepted") == 1
        assert app.coordinator.workers[CAM1].restarts == restarts
    # the record of signed ids is in the state file: a restarted agent does not run it either
    document = json.loads((tmp_path / "state" / "state.json").read_bytes())
    assert rid in document["signed_until"]
    assert len(document["outcomes"]) == 301
    async with agent_and_observer(mqtt5, config) as (app, obs):
        await obs.wait_for(lambda: obs.detections(CAM1, "CAM_A"), what="restored and booted")
        restarts = app.coordinator.workers[CAM1].restarts
        replayed = await answer(obs, topic, *original)
        assert (replayed.request_id, replayed.state) == (rid, "succeeded")
        assert obs.states(rid) == ["succeeded"]  # answered from the record only
        assert app.coordinator.workers[CAM1].restarts == restarts


async def test_a_signed_request_cut_off_by_a_crash_stays_kept(
    mqtt5: Broker, tmp_path: Path
) -> None:
    """A state file as a crash leaves it: a signed request accepted, unfinished."""
    config = make_config(mqtt5, tmp_path / "state", security=security())
    until = time.time() + 120
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "state.json").write_bytes(
        msgspec.json.encode(
            {
                "version": 1,
                "in_flight": [
                    {"request_id": "cut", "action": "delete", "camera": CAM1, "stream": "CAM_A"}
                ],
                "signed_until": {"cut": until},
            }
        )
    )
    async with agent_and_observer(mqtt5, config) as (app, obs):
        first = await obs.outcome("cut")
        assert (first.state, code(first)) == ("failed", "interrupted")
        request = app.coordinator.requests.get("cut", CAM1)
        assert request is not None
        assert request.keep_until == until
        topic = obs.topics.command(CAM1, "CAM_A", "delete")
        replayed = await answer(
            obs, topic, *signed(topic, {"request_id": "cut", "expires_at": until})
        )
        assert (replayed.request_id, replayed.state, code(replayed)) == (
            "cut",
            "failed",
            "interrupted",
        )
        assert "accepted" not in obs.states("cut")
    assert json.loads((tmp_path / "state" / "state.json").read_bytes())["signed_until"] == {
        "cut": until
    }


async def test_a_replay_after_expires_at_is_expired(mqtt5: Broker, tmp_path: Path) -> None:
    async with signed_agent(mqtt5, tmp_path, security()) as (_, obs):
        topic = obs.topics.command(CAM1, "CAM_A", "delete")
        body = delete_body(_rid(), expires_in=1.0)
        message = signed(topic, body)
        first = await answer(obs, topic, *message)
        assert first.state == "succeeded"
        with anyio.fail_after(WAIT):  # the command's own clock: its expires_at must pass
            while time.time() <= body["expires_at"]:  # noqa: ASYNC110  # a clock, no event
                await anyio.sleep(body["expires_at"] - time.time() + 0.05)
        again = await answer(obs, topic, *message)
        assert (again.request_id, again.state, code(again)) == (
            body["request_id"],
            "rejected",
            "expired",
        )


async def test_a_full_replay_record_refuses_more_signed_commands(
    mqtt5: Broker, tmp_path: Path
) -> None:
    section = security(max_signed_requests=2)
    async with signed_agent(mqtt5, tmp_path, section) as (_, obs):
        topic = obs.topics.command(CAM1, "CAM_A", "delete")
        sent = {rid: signed(topic, delete_body(rid, 30)) for rid in ("k1", "k2")}
        for message in sent.values():
            event = await answer(obs, topic, *message)
            assert event.state == "succeeded"
        full = await answer(obs, topic, *signed(topic, delete_body("k3")))
        assert (full.request_id, full.state, code(full)) == ("k3", "rejected", "replay_window_full")
        assert full.error is not None
        assert re.search(r"2 signed requests .* send it again in (29|30) s", full.error.message)
        # a replay of a kept one is still answered from the record
        replayed = await answer(obs, topic, *sent["k1"])
        assert (replayed.request_id, replayed.state) == ("k1", "succeeded")
        assert obs.states("k1").count("accepted") == 1


async def test_signing_off_old_senders_work_and_a_bad_signature_is_still_refused(
    mqtt5: Broker, tmp_path: Path
) -> None:
    async with signed_agent(mqtt5, tmp_path, security(require=False)) as (app, obs):
        topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        plain = await answer(obs, topic, msgspec.json.encode({"request_id": "p1", **deploy_body()}))
        assert (plain.state, plain.error) == ("succeeded", None)
        request = app.coordinator.requests.get("p1", CAM1)
        assert request is not None
        assert request.authenticity == Authenticity(signed=False)
        good = await answer(obs, topic, *signed(topic, deploy_body("g1")))
        assert good.state == "succeeded"
        bad = await answer(obs, topic, *signed(topic, deploy_body("b1"), STRANGER))
        assert (bad.request_id, code(bad)) == ("b1", "bad_signature")


async def test_u_feff_in_a_string_property_does_not_drop_the_connection(
    mqtt5: Broker, tmp_path: Path
) -> None:
    """paho refused U+FEFF in string properties: each delivery of such a command dropped the
    connection, and the broker delivered it again on every reconnect (agent/paho_fast.py)."""
    async with signed_agent(mqtt5, tmp_path, security(require=False)) as (app, obs):
        connects = app.link.stats.connects
        topic = obs.topics.command(CAM1, "CAM_A", "delete")
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [("note", "\ufeff")]
        properties.ResponseTopic = "replies/\ufeff"
        event = await answer(obs, topic, msgspec.json.encode({"request_id": "bom"}), properties)
        assert (event.request_id, event.state) == ("bom", "succeeded")
        assert app.link.stats.connects == connects


async def test_simulator_knobs_obey_the_same_rule(mqtt5: Broker, tmp_path: Path) -> None:
    async with signed_agent(mqtt5, tmp_path, security()) as (app, obs):
        unplug = obs.topics.simulator(CAM1, "unplug")
        delete = obs.topics.command(CAM1, "CAM_A", "delete")
        await obs.send(unplug, b"")  # unsigned: refused
        await publish(obs, unplug, signed(unplug, b"", STRANGER))  # does not verify: refused
        cam2_unplug = obs.topics.simulator(CAM2, "unplug")
        await publish(
            obs, cam2_unplug, signed(cam2_unplug, b"", CAM1_ONLY, "cam1")
        )  # not its camera
        # each camera's messages are handled in arrival order: still online for these
        for camera, stream in ((CAM1, "CAM_A"), (CAM2, "CAM_A")):
            topic = obs.topics.command(camera, stream, "delete")
            event = await answer(obs, topic, *signed(topic, delete_body(_rid())))
            assert event.state == "succeeded", event
        assert app.backend.cameras[CAM1].present
        assert app.backend.cameras[CAM2].present
        await publish(obs, unplug, signed(unplug, b"", CAM1_ONLY, "cam1"))
        event = await answer(obs, delete, *signed(delete, delete_body(_rid())))
        assert code(event) == "camera_offline"


@given(payload=st.binary(max_size=300) | envelopes, properties=user_properties)
@example(payload=b"{}", properties=[("oak-key-id", "a\ufeffb"), ("oak-signature", "x")])
@example(payload=b"{}", properties=[("oak-key-id", "ops")] * 3 + [("oak-signature", "A" * 30_000)])
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_arbitrary_properties_and_envelopes_are_answered(
    live: tuple[Any, App, Observer], payload: bytes, properties: list[tuple[str, str]]
) -> None:
    portal, app, obs = live
    topic = obs.topics.command(CAM1, "CAM_A", "deploy")
    props = None
    if properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = properties
    connects = app.link.stats.connects
    event = portal.call(answer, obs, topic, payload, props)
    assert event.state == "rejected"
    assert code(event) in ("unauthorized", "bad_signature", "invalid_payload"), event
    assert app.link.stats.connects == connects  # the connection was never dropped
    assert app.coordinator.workers[CAM1].restarts == 0


@pytest.fixture(scope="module")
def live(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, App, Observer]]:
    """One agent requiring signatures for every example, in a portal's event loop."""
    if not broker.mqtt5:
        pytest.skip("user properties need an MQTT 5 broker (mosquitto)")
    config = make_config(broker, tmp_path_factory.mktemp("fuzz-signed"), security=security())
    with start_blocking_portal("asyncio") as portal, contextlib.ExitStack() as stack:
        app, observer = stack.enter_context(
            portal.wrap_async_context_manager(agent_and_observer(broker, config))
        )
        yield portal, app, observer


# --- MQTT 3.1.1: the envelope ------------------------------------------------------------------


async def test_the_envelope_through_amqtt(amqtt: Broker, tmp_path: Path) -> None:
    async with signed_agent(amqtt, tmp_path, security()) as (app, obs):
        assert app.link.protocol == "3.1.1"
        topic = obs.topics.command(CAM1, "CAM_A", "deploy")
        rid = _rid()
        message = signed(topic, deploy_body(rid), as_envelope=True)
        event = await answer(obs, topic, *message)
        assert (event.request_id, event.state) == (rid, "succeeded")
        request = app.coordinator.requests.get(rid, CAM1)
        assert request is not None
        assert request.authenticity == Authenticity(True, "ops")
        replayed = await answer(obs, topic, *message)
        assert (replayed.request_id, replayed.state) == (rid, "succeeded")
        assert obs.states(rid).count("accepted") == 1
        wrong = await answer(
            obs, topic, *signed(topic, deploy_body("w"), STRANGER, as_envelope=True)
        )
        assert (wrong.request_id, code(wrong)) == ("w", "bad_signature")  # its id, from inside
        unsigned = await answer(
            obs, topic, msgspec.msgpack.encode({**deploy_body("u"), "model": SSD.read_bytes()})
        )
        assert (unsigned.request_id, code(unsigned)) == ("u", "unauthorized")
        cam2 = obs.topics.command(CAM2, "CAM_A", "deploy")
        moved = await answer(
            obs, cam2, *signed(cam2, deploy_body("m"), sign_for=topic, as_envelope=True)
        )
        assert code(moved) == "bad_signature"
        # a MessagePack deploy inside the envelope, the model as bin
        inner = msgspec.msgpack.encode({**deploy_body("mp"), "model": SSD.read_bytes()})
        event = await answer(obs, topic, *signed(topic, inner, as_envelope=True))
        assert (event.request_id, event.state) == ("mp", "succeeded")


# --- the client, as a user runs it ---------------------------------------------------------


async def oak(*args: str, timeout: float = WAIT) -> tuple[int, str, str]:
    with anyio.fail_after(timeout):
        done = await anyio.run_process([*OAK, *args], check=False, cwd=ROOT)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
async def test_keygen_and_signed_client_commands(kind: str, broker: Broker, tmp_path: Path) -> None:
    if kind == "mosquitto" and broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    code_, out, err = await oak("keygen", "--out", str(tmp_path / "keys"), "--key-id", "operator")
    assert code_ == 0, err
    key = tmp_path / "keys" / "operator.key"
    assert key.stat().st_mode & 0o777 == 0o600
    # as printed, with a max_command_age below the client's default 60 s: --config tells it
    snippet = out[out.index("[security]") :].replace(
        "[security]\n", "[security]\nmax_command_age = 30\n"
    )
    agent_id = f"signed-{uuid.uuid4().hex[:8]}"
    if kind == "amqtt":
        where = Broker(kind="amqtt", host="127.0.0.1", port=free_port(), pid=0)
        extra = "\n[broker]\nembedded = true\n"
    else:
        where, extra = broker, ""
    config = write_config(
        tmp_path / "agent.toml",
        where,
        tmp_path / "state",
        agent_id,
        mqtt_extra=extra + "\n" + snippet,
    )
    topics = Topics.for_agent("oaktest", agent_id)
    with agent_process(config, tmp_path / "agent.log"):
        await _listening(where.port)
        async with observe(where, topics) as obs:
            await obs.wait_for(lambda: obs.latest(topics.availability) == b"online", what="online")
            target = ("--camera", CAM1, "--stream", "CAM_A")
            model = ("--model", str(SSD), "--nn-config", '{"type": "MobileNet"}')
            code_, out, err = await oak(
                "deploy",
                "--config",
                str(config),
                *target,
                *model,
                "--sign-key",
                str(key),
                "--request-id",
                "signed-1",
            )
            assert code_ == 0, (out, err)
            assert [json.loads(line)["state"] for line in out.splitlines()] == [
                "accepted",
                "applying",
                "succeeded",
            ]
            code_, out, err = await oak(
                "deploy", "--config", str(config), *target, *model, "--request-id", "plain-1"
            )
            assert code_ == 1, (out, err)
            assert "request plain-1 rejected (unauthorized)" in err
            # without --config: MQTT 5 first, and the envelope when the broker refuses it
            flags = (
                "--host",
                "127.0.0.1",
                "--port",
                str(where.port),
                "--prefix",
                "oaktest",
                "--agent",
                agent_id,
            )
            code_, out, err = await oak(
                "delete", *flags, *target, "--sign-key", str(key), "--expires-in", "30"
            )
            assert code_ == 0, (out, err)
            code_, out, err = await oak(
                "delete", *flags, *target, "--sign-key", str(key), "--key-id", "ops"
            )
            assert code_ == 1, (out, err)
            assert "(unauthorized)" in err, err
            commands = [
                m for m in obs.messages if m.topic == topics.command(CAM1, "CAM_A", "deploy")
            ]
    carried = [bool(m.properties and getattr(m.properties, "UserProperty", None)) for m in commands]
    if kind == "mosquitto":
        assert carried == [True, False]  # user properties on MQTT 5
    else:
        assert carried == [False, False]  # in the envelope
        assert commands[0].payload.startswith(b"\x83")


async def _listening(port: int) -> None:
    with anyio.fail_after(WAIT):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return


async def test_client_refuses_a_key_it_cannot_use(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    args = ("deploy", "--agent", "a", "--camera", CAM1, "--stream", "CAM_A", "--model", str(SSD))
    for extra, says in (
        (("--sign-key", str(junk)), "is not an unencrypted PEM private key"),
        (("--sign-key", str(tmp_path / "none.key")), "cannot read"),
        (("--key-id", "ops"), "--key-id goes with --sign-key"),
    ):
        code_, _, err = await oak(*args, *extra)
        assert code_ == 2, err
        assert says in err
        assert "Traceback" not in err
    code_, _, err = await oak("keygen", "--out", str(tmp_path), "--key-id", "junk")
    assert code_ == 2
    assert re.search(r"junk.key exists; keygen never overwrites a key", err), err
