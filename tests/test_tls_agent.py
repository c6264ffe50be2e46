"""The agent on a secured mosquitto: TLS, mutual TLS with an ACL, a password file, WebSockets,
and brokers that refuse it until they are fixed (the agent says why once and keeps trying).

Each broker has a plain anonymous listener for the test's observer and the secured listener
the agent uses; the agent runs as `oak-agent run --config` in its own process.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from agent.topics import Topics
from tests.agent_process import agent_process, write_config
from tests.brokers import Broker, free_port, mosquitto_path, run_broker
from tests.certs import Pki, make_pki
from tests.harness import CAM1, WAIT, observe

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.agent_process import AgentProcess
    from tests.harness import Observer

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto"),
]

PASSWORD = "agent-passw0rd"  # noqa: S105  # a test broker's password
BLOB = base64.b64encode((Path(__file__).parent / "data/blobs/ssd_tiny.blob").read_bytes()).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclasses.dataclass(frozen=True, slots=True)
class Site:
    observer: Broker  # the plain listener
    agent: Broker  # the secured listener
    agent_id: str

    @property
    def topics(self) -> Topics:
        return Topics.for_agent("oaktest", self.agent_id)


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    pytest.fail(f"nothing listens on port {port}")


@contextlib.contextmanager
def _site(
    workdir: Path, secured: tuple[str, ...], *, agent_port: int | None = None, agent_id: str = ""
) -> Iterator[Site]:
    """mosquitto with an anonymous listener and a second one configured by `secured`."""
    agent_port = agent_port or free_port()
    settings = (
        "per_listener_settings true",
        "allow_anonymous true",
        f"listener {agent_port} 127.0.0.1",
        *secured,
    )
    with run_broker("mosquitto", workdir, settings=settings) as plain:
        _wait_port(agent_port)
        yield Site(plain, dataclasses.replace(plain, port=agent_port), agent_id)


def _tls(cert: Path, key: Path, ca: Path) -> tuple[str, ...]:
    return (f"cafile {ca}", f"certfile {cert}", f"keyfile {key}")


def _config(tmp_path: Path, site: Site, mqtt_extra: str) -> Path:
    return write_config(
        tmp_path / "agent.toml",
        site.agent,
        tmp_path / "state",
        site.agent_id,
        reconnect=(0.2, 1.0),
        mqtt_extra=mqtt_extra,
    )


def _agent_id() -> str:
    return f"tls-{uuid.uuid4().hex[:8]}"


async def _deploys(obs: Observer) -> None:
    """The agent is online and a deploy sent to it succeeds."""
    await obs.wait_for(lambda: obs.latest(obs.topics.availability) == b"online", WAIT, "online")
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    body = {"request_id": request_id, "nn_config": {"type": "MobileNet"}, "model": BLOB}
    await obs.deploy(CAM1, "CAM_A", body)
    event = await obs.outcome(request_id)
    assert (event.state, event.error) == ("succeeded", None), event


async def _logged(agent: AgentProcess, event: str, timeout: float = WAIT) -> None:
    with anyio.fail_after(timeout):
        while not agent.logged(event):  # noqa: ASYNC110  # a log file, nothing to wait on
            await anyio.sleep(0.1)


async def test_mutual_tls_with_an_acl_for_the_agents_own_topics(pki: Pki, tmp_path: Path) -> None:
    agent_id = _agent_id()
    acl = tmp_path / "acl"
    # the broker knows the agent by its certificate's name and lets it use its own topics only
    acl.write_text(f"user {pki.client_name}\ntopic readwrite oaktest/{agent_id}/#\n")
    secured = (
        *_tls(pki.broker_cert, pki.broker_key, pki.ca),
        "require_certificate true",
        "use_identity_as_username true",
        f"acl_file {acl}",
    )
    with _site(tmp_path / "broker", secured, agent_id=agent_id) as site:
        tls = (
            f'[mqtt.tls]\nca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\n'
            f'key_file = "{pki.client_key}"\n'
        )
        config = _config(tmp_path, site, tls)
        async with observe(site.observer, site.topics) as obs:
            with agent_process(config, tmp_path / "agent.log") as agent:
                await _deploys(obs)
        connected = agent.logged("mqtt connected")
        assert connected[0]["broker"] == f"127.0.0.1:{site.agent.port} (mutual TLS)"


async def test_a_password_file_and_websockets(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(  # noqa: ASYNC221  # a quick tool, before any agent runs
        ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", PASSWORD],
        check=True,
        capture_output=True,
        timeout=30,
    )
    secured = ("protocol websockets", "allow_anonymous false", f"password_file {passwords}")
    with _site(tmp_path / "broker", secured, agent_id=_agent_id()) as site:
        (tmp_path / "mqtt-password").write_text(PASSWORD + "\n")
        extra = 'username = "agent"\npassword_file = "mqtt-password"\ntransport = "websockets"\n'
        config = _config(tmp_path, site, extra)
        async with observe(site.observer, site.topics) as obs:
            with agent_process(config, tmp_path / "agent.log") as agent:
                await _deploys(obs)
        assert PASSWORD not in (tmp_path / "agent.log").read_text()
        assert agent.logged("mqtt connected")[0]["broker"].endswith("(websockets)")


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("impostor", "is not trusted by"),
        ("misnamed", "is not valid for the name '127.0.0.1'"),
        ("password", "refused the credentials"),
    ],
)
async def test_a_refusing_broker_is_explained_once_and_retried_until_fixed(
    pki: Pki, tmp_path: Path, fault: str, says: str
) -> None:
    """Wrong CA, wrong name, wrong password: one clear error line and retries; once the broker
    is fixed and restarted on the same port, the same agent process connects."""
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")

    def broker_files(password: str, cert: Path, key: Path) -> tuple[str, ...]:
        passwords = tmp_path / f"passwords-{password}"
        subprocess.run(  # a quick tool, before any agent runs
            ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", password],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return (*_tls(cert, key, pki.ca), f"password_file {passwords}", "allow_anonymous false")

    good = broker_files(PASSWORD, pki.broker_cert, pki.broker_key)
    bad = {
        "impostor": broker_files(PASSWORD, pki.impostor_cert, pki.impostor_key),
        "misnamed": broker_files(PASSWORD, pki.misnamed_cert, pki.misnamed_key),
        "password": broker_files("another-password", pki.broker_cert, pki.broker_key),
    }[fault]
    port = free_port()
    extra = f'username = "agent"\npassword_file = "{secret}"\n[mqtt.tls]\nca_file = "{pki.ca}"\n'
    where = Broker(kind="mosquitto", host="127.0.0.1", port=port, pid=0)  # started below
    config = _config(tmp_path, Site(where, where, _agent_id()), extra)
    with agent_process(config, tmp_path / "agent.log") as agent:
        with _site(tmp_path / "bad", bad, agent_port=port):
            with anyio.fail_after(WAIT):
                while len(agent.logged("mqtt disconnected, reconnecting")) < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            errors = [line for line in agent.log_lines() if line.get("level") == "error"]
        assert len(errors) == 1, errors  # once per distinct cause, however often it retries
        assert says in str(errors[0]["event"]), errors[0]
        assert not agent.logged("mqtt connected")
        assert agent.process.poll() is None, "the agent keeps running"
        with _site(tmp_path / "good", good, agent_port=port):
            await _logged(agent, "mqtt connected")
    assert PASSWORD not in (tmp_path / "agent.log").read_text()
