"""The broker options builder against a real mosquitto with TLS, mTLS, passwords and an ACL."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import time
import uuid
from typing import TYPE_CHECKING

import aiomqtt
import anyio
import msgspec
import pytest

from agent.config import ConfigError, MqttSection, TlsSection, load_config
from agent.connect import BrokerOptions, ConnectProblem, broker_options, connect_problem
from tests.brokers import free_port, mosquitto_path, run_broker
from tests.certs import Pki, make_pki

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.brokers import Broker

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto"),
]

PASSWORD = "s3cret-passw0rd"  # noqa: S105  # a test broker's password


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_lines(pki: Pki) -> tuple[str, ...]:
    return (f"cafile {pki.ca}", f"certfile {pki.broker_cert}", f"keyfile {pki.broker_key}")


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("tls")
    with run_broker(
        "mosquitto", workdir, settings=(*_tls_lines(pki), "allow_anonymous true")
    ) as broker:
        yield broker


@pytest.fixture(scope="module")
def mtls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Client certificates required, the certificate's name is the username, and an ACL."""
    workdir = tmp_path_factory.mktemp("mtls")
    acl = workdir / "acl"
    acl.write_text(f"user {pki.client_name}\ntopic readwrite oak/{pki.client_name}/#\n")
    settings = (
        *_tls_lines(pki),
        "require_certificate true",
        "use_identity_as_username true",
        f"acl_file {acl}",
    )
    with run_broker("mosquitto", workdir, settings=settings) as broker:
        yield broker


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("passwd")
    passwords = workdir / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", PASSWORD],
        check=True,
        capture_output=True,
        timeout=30,
    )
    settings = ("allow_anonymous false", f"password_file {passwords}")
    with run_broker("mosquitto", workdir, settings=settings) as broker:
        yield broker


@pytest.fixture(scope="module")
def ws_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A TCP listener and a WebSockets one (mosquitto 2.0.11 starts none with a lone one)."""
    workdir = tmp_path_factory.mktemp("ws")
    port = free_port()
    settings = ("allow_anonymous true", f"listener {port} 127.0.0.1", "protocol websockets")
    with run_broker("mosquitto", workdir, settings=settings) as broker:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the WebSockets listener opens after the TCP one
            with contextlib.suppress(OSError), socket.create_connection((broker.host, port), 0.2):
                break
            time.sleep(0.02)
        yield dataclasses.replace(broker, port=port)


async def _round_trip(options: BrokerOptions, topic: str) -> None:
    """Connect, subscribe, publish, and receive the message back."""
    identifier = f"test-{uuid.uuid4().hex[:8]}"
    with anyio.fail_after(10):
        async with aiomqtt.Client(**options.client_kwargs(), identifier=identifier) as client:
            await client.subscribe(topic, qos=1)
            await client.publish(topic, b"hello", qos=1)
            async for message in client.messages:
                assert message.payload == b"hello"
                return


async def _connect_error(options: BrokerOptions) -> BaseException:
    with anyio.fail_after(10):
        try:
            async with aiomqtt.Client(**options.client_kwargs(), timeout=5):
                pass
        except aiomqtt.MqttError as exc:
            return exc
    pytest.fail("the connection should have been refused")


async def _described(options: BrokerOptions, expected: str) -> ConnectProblem | None:
    """The problem described for a refused connection, over up to three attempts, as the
    agent retries: on a busy machine the broker's TLS 1.3 alert can lose the race with its
    closing the connection, and that attempt is then only a lost connection."""
    problem = None
    for _ in range(3):
        problem = connect_problem(await _connect_error(options), options)
        if problem is not None and expected in problem.message:
            break
    return problem


def _settings(broker: Broker, **fields: object) -> MqttSection:
    return msgspec.structs.replace(MqttSection(host=broker.host, port=broker.port), **fields)


async def test_tls_with_the_brokers_ca(tls_broker: Broker, pki: Pki) -> None:
    options = broker_options(_settings(tls_broker, tls=TlsSection(ca_file=str(pki.ca))))
    assert options.where == f"{tls_broker.host}:{tls_broker.port} (TLS)"
    await _round_trip(options, "oak/tls/test")


async def test_server_name_replaces_the_host_in_the_certificate_check(
    tls_broker: Broker, pki: Pki
) -> None:
    good = TlsSection(ca_file=str(pki.ca), server_name="localhost")
    await _round_trip(broker_options(_settings(tls_broker, tls=good)), "oak/tls/name")
    wrong = TlsSection(ca_file=str(pki.ca), server_name="broker.example")
    options = broker_options(_settings(tls_broker, tls=wrong))
    problem = connect_problem(await _connect_error(options), options)
    assert problem is not None
    assert "is not valid for the name 'broker.example'" in problem.message
    assert "mqtt.tls.server_name" in problem.message


async def test_an_unknown_ca_is_named(tls_broker: Broker, pki: Pki) -> None:
    options = broker_options(_settings(tls_broker, tls=TlsSection(ca_file=str(pki.other_ca))))
    problem = connect_problem(await _connect_error(options), options)
    assert problem is not None
    assert f"is not trusted by {pki.other_ca}" in problem.message, problem.message
    again = connect_problem(await _connect_error(options), options)
    assert again is not None
    assert again.cause == problem.cause  # logged once per distinct cause


async def test_insecure_skip_verify_accepts_any_certificate(tls_broker: Broker, pki: Pki) -> None:
    tls = TlsSection(ca_file=str(pki.other_ca), insecure_skip_verify=True)
    options = broker_options(_settings(tls_broker, tls=tls))
    assert options.insecure
    await _round_trip(options, "oak/tls/insecure")


async def test_plain_tcp_to_a_tls_listener_is_no_tls_or_login_problem(tls_broker: Broker) -> None:
    options = broker_options(_settings(tls_broker))
    error = await _connect_error(options)
    # the broker waits for a TLS ClientHello: a plain CONNECT goes unanswered
    assert connect_problem(error, options) is None


async def test_mutual_tls_and_the_acl(mtls_broker: Broker, pki: Pki) -> None:
    tls = TlsSection(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    options = broker_options(_settings(mtls_broker, tls=tls))
    assert options.where.endswith("(mutual TLS)")
    await _round_trip(options, f"oak/{pki.client_name}/status")


async def test_mutual_tls_without_a_client_certificate_is_explained(
    mtls_broker: Broker, pki: Pki
) -> None:
    options = broker_options(_settings(mtls_broker, tls=TlsSection(ca_file=str(pki.ca))))
    problem = await _described(options, "client certificate")
    assert problem is not None, "no TLS problem recognised"
    assert "client certificate" in problem.message, problem.message


async def test_a_client_certificate_from_another_ca_is_refused(
    mtls_broker: Broker, pki: Pki
) -> None:
    tls = TlsSection(
        ca_file=str(pki.ca), cert_file=str(pki.stranger_cert), key_file=str(pki.stranger_key)
    )
    options = broker_options(_settings(mtls_broker, tls=tls))
    expected = f"refused the client certificate {pki.stranger_cert}"
    problem = await _described(options, expected)
    assert problem is not None
    assert expected in problem.message, problem.message


async def test_password_file(password_broker: Broker, tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    options = broker_options(
        _settings(password_broker, username="agent", password_file=str(secret))
    )
    assert options.password == PASSWORD
    assert PASSWORD not in repr(options)
    await _round_trip(options, "oak/passwd/test")


async def test_a_wrong_password_is_reported_without_the_password(
    password_broker: Broker, tmp_path: Path
) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("not-the-password\n")
    options = broker_options(
        _settings(password_broker, username="agent", password_file=str(secret))
    )
    problem = connect_problem(await _connect_error(options), options)
    assert problem is not None
    assert "refused the credentials" in problem.message
    assert str(secret) in problem.message
    assert "not-the-password" not in problem.message


async def test_websockets(ws_broker: Broker) -> None:
    options = broker_options(_settings(ws_broker, transport="websockets"))
    assert options.websocket_path == "/mqtt"
    await _round_trip(options, "oak/ws/test")


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read"):
        broker_options(MqttSection(password_file=str(missing)))
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        broker_options(MqttSection(password_file=str(empty)))
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file: cannot load"):
        broker_options(MqttSection(tls=TlsSection(ca_file=str(missing))))
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file"):
        broker_options(MqttSection(tls=TlsSection(ca_file=str(not_pem))))


def test_config_checks(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[mqtt]\npassword = "a"\npassword_file = "b"\n')
    with pytest.raises(ConfigError, match="password or password_file, not both"):
        load_config(path)
    path.write_text('[mqtt.tls]\ncert_file = "agent.crt"\n')
    with pytest.raises(ConfigError, match="both cert_file and key_file"):
        load_config(path)


def test_relative_credentials_are_found_in_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text(PASSWORD + "\n")
    (folder / "ca.pem").write_text("")
    path = folder / "agent.toml"
    path.write_text(
        '[mqtt]\npassword_file = "mqtt-password"\n'
        '[mqtt.tls]\nca_file = "ca.pem"\ncert_file = "agent.crt"\nkey_file = "agent.key"\n'
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = load_config(path)
    assert config.mqtt.password_file == str(credentials / "mqtt-password")
    assert config.mqtt.tls is not None
    # not among the credentials: beside the config file
    assert config.mqtt.tls.key_file == str(folder / "agent.key")
    # the CA is no secret: never looked up among the credentials
    assert config.mqtt.tls.ca_file == str(folder / "ca.pem")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert load_config(path).mqtt.password_file == str(folder / "mqtt-password")
