"""The agent against a real Home Assistant (core 2025.4.4 from PyPI, in its own venv).

Not run by default (marker `homeassistant`): `scripts/test -m homeassistant`. Needs
Python 3.13 (`OAK_HA_PYTHON`, `python3.13` on PATH, or pyenv's 3.13.x); the first run
makes the venv `~/.cache/oak-edge-agent/ha-venv` (`$OAK_HA_VENV` to move it) with pip,
about 2 minutes; later runs reuse it. HA runs as `hass -c DIR --skip-pip` on a free
loopback port; the test onboards a user and adds the MQTT integration through HA's REST
API, as a person would in the UI, then checks what HA made of the discovery configs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import msgspec
import pytest

from agent.config import BrokerSection, HomeAssistantSection, MqttSection
from agent.topics import Topics
from tests.brokers import Broker, BrokerUnavailable, free_port, mosquitto_path, run_broker
from tests.harness import CAM1, CAM2, make_config, observe, running_agent

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from agent.config import Config

pytestmark = [pytest.mark.homeassistant, pytest.mark.anyio, pytest.mark.timeout(1200)]

HA_VERSION: Final = "2025.4.4"
# core, the MQTT integration's requirement, and the frontend HA refuses to start without
HA_PACKAGES: Final = (
    f"homeassistant=={HA_VERSION}",
    "paho-mqtt==2.1.0",
    "home-assistant-frontend==20250411.0",
)
_INSTALL_TIMEOUT: Final = 1800.0
_START_TIMEOUT: Final = 180.0
_WAIT: Final = 60.0  # for HA to show a change the agent published
_POLL: Final = 0.5
_HA_CONFIG: Final = """\
homeassistant:
  name: oak-test
  unit_system: metric
  time_zone: UTC
  country: DE
  currency: EUR
  latitude: 0
  longitude: 0
  elevation: 0
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
onboarding:
logger:
  default: warning
"""


def _python313() -> str | None:
    """A Python 3.13 that runs (a pyenv shim on PATH may not)."""
    candidates = [os.environ.get("OAK_HA_PYTHON")]
    pyenv = Path.home() / ".pyenv" / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / "python3.13") for p in sorted(pyenv.glob("3.13*"))]
    candidates.append(shutil.which("python3.13"))
    for candidate in filter(None, candidates):
        check = [candidate, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 13))"]
        if subprocess.run(check, capture_output=True, check=False, timeout=30).returncode == 0:
            return candidate
    return None


def _venv_path() -> Path:
    return Path(
        os.environ.get("OAK_HA_VENV") or Path.home() / ".cache" / "oak-edge-agent" / "ha-venv"
    )


@pytest.fixture(scope="session")
def hass_bin() -> Path:
    """`hass` of a venv holding Home Assistant core; made (once) when missing."""
    venv = _venv_path()
    marker = venv / f".oak-ha-{HA_VERSION}"
    if not marker.is_file():
        python = _python313()
        if python is None:
            pytest.skip("Home Assistant 2025.4 needs Python 3.13: none found (set OAK_HA_PYTHON)")
        started = time.monotonic()
        try:
            subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *HA_PACKAGES],
                check=True,
                timeout=_INSTALL_TIMEOUT,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot install Home Assistant {HA_VERSION} into {venv}: {exc}")
        marker.write_text(f"installed in {time.monotonic() - started:.0f} s\n")
        sys.stderr.write(f"\nHome Assistant venv made in {time.monotonic() - started:.0f} s\n")
    return venv / "bin" / "hass"


# --- Home Assistant over its REST API ---------------------------------------------------------


class Hass:
    """A running Home Assistant, spoken to over its REST API."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log = log
        self.token: str | None = None

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, form: bool = False
    ) -> Any:
        headers = {}
        data = None
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310  # http to 127.0.0.1 only
            self.url + path, data=data, headers=headers, method=method
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, form: bool = False
    ) -> Any:
        return await anyio.to_thread.run_sync(lambda: self._request(method, path, body, form=form))

    async def started(self) -> None:
        with anyio.fail_after(_START_TIMEOUT):
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"hass exited: {self.tail()}")
                with contextlib.suppress(OSError):
                    if await self.call("GET", "/api/onboarding") is not None:
                        return
                await anyio.sleep(_POLL)

    async def onboard(self) -> None:
        """Create the owner as the onboarding screen does, and log in."""
        client_id = f"{self.url}/"
        answer = await self.call(
            "POST",
            "/api/onboarding/users",
            {
                "client_id": client_id,
                "name": "Test",
                "username": "test",
                "password": uuid.uuid4().hex,
                "language": "en",
            },
        )
        grant = {
            "grant_type": "authorization_code",
            "code": answer["auth_code"],
            "client_id": client_id,
        }
        self.token = (await self.call("POST", "/auth/token", grant, form=True))["access_token"]

    async def add_mqtt(self, broker: Broker) -> None:
        """Settings > Devices & services > Add integration > MQTT, through the REST flow."""
        flow = await self.call("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        assert (flow["type"], flow["step_id"]) == ("form", "broker"), flow
        done = await self.call(
            "POST",
            f"/api/config/config_entries/flow/{flow['flow_id']}",
            {"broker": broker.host, "port": broker.port},
        )
        assert done["type"] == "create_entry", done
        assert done["result"]["state"] == "loaded", done

    async def state(self, entity_id: str) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = await self.call("GET", f"/api/states/{entity_id}")
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response's socket
            if exc.code == 404:
                return None
            raise
        return state

    async def until(self, what: str, check: Callable[[], Any], timeout: float = _WAIT) -> Any:
        """Poll HA (its REST API has no way to wait) until `check` returns neither None nor
        False."""
        with anyio.fail_after(timeout):
            while True:
                found = await check()
                if found is not None and found is not False:
                    return found
                await anyio.sleep(_POLL)
        raise AssertionError(what)  # pragma: no cover

    async def template(self, text: str) -> str:
        return await anyio.to_thread.run_sync(lambda: self._template(text))

    def _template(self, text: str) -> str:
        request = urllib.request.Request(  # noqa: S310  # http to 127.0.0.1 only
            f"{self.url}/api/template",
            data=json.dumps({"template": text}).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return str(response.read().decode())

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@contextlib.contextmanager
def running_hass(hass_bin: Path, workdir: Path) -> Iterator[Hass]:
    config = workdir / "hass"
    config.mkdir(parents=True)
    port = free_port()
    (config / "configuration.yaml").write_text(_HA_CONFIG.format(port=port))
    log = workdir / "hass.out"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(hass_bin), "-c", str(config), "--skip-pip"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Hass(port, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def _device(hass: Hass, state: str, connectivity: str) -> None:
    """The camera's device as HA's device registry holds it, with the agent as its hub."""
    device = f"device_id('{state}')"
    asks = ["'manufacturer'", "'model'", "'serial_number'"]
    described = await hass.template(
        "|".join("{{ device_attr(" + device + ", " + ask + ") }}" for ask in asks)
        + "|{{ device_attr("
        + device
        + ", 'via_device_id') == device_id('"
        + connectivity
        + "') }}"
    )
    assert described == f"Luxonis|OAK (simulated)|{CAM1}|True"


async def _is(hass: Hass, entity: str, value: str) -> bool:
    found = await hass.state(entity)
    return found is not None and found["state"] == value


async def _counts(hass: Hass, agent: str) -> None:
    """Two persons in every frame: the counts and presence entities show them."""
    present = _entity("binary_sensor", agent, CAM1, "CAM_A", "person", "present")
    await hass.until("person present", lambda: _is(hass, present, "on"))
    objects = _entity("sensor", agent, CAM1, "CAM_A", "objects")
    await hass.until("two objects", lambda: _is(hass, objects, "2"))
    persons = _entity("sensor", agent, CAM1, "CAM_A", "person", "count")
    await hass.until("two persons", lambda: _is(hass, persons, "2"))
    # no car in the schedule: absent once off_seconds passed
    car = _entity("binary_sensor", agent, CAM1, "CAM_A", "car", "present")
    await hass.until("car absent", lambda: _is(hass, car, "off"))


async def _health(hass: Hass, agent: str) -> None:
    """The camera's and the agent's stats, as HA sensors."""
    temperature = _entity("sensor", agent, CAM1, "temperature")
    heat = await hass.until("temperature", lambda: _numeric(hass, temperature))
    assert 20.0 < heat < 100.0
    fps = _entity("sensor", agent, CAM1, "CAM_A", "fps")
    assert await hass.until("NN rate", lambda: _numeric(hass, fps)) > 0
    memory = _entity("sensor", agent, CAM1, "memory_ddr")
    assert 0 <= await hass.until("DDR use", lambda: _numeric(hass, memory)) <= 100
    rss = _entity("sensor", agent, "rss")
    assert await hass.until("agent RSS", lambda: _numeric(hass, rss)) > 1_000_000
    dropped = _entity("sensor", agent, "detections_dropped")
    assert await hass.until("drops", lambda: _numeric(hass, dropped)) >= 0


async def _numeric(hass: Hass, entity: str) -> float | None:
    """The entity's state as a number; None while unknown."""
    found = await hass.state(entity)
    if found is None:
        return None
    try:
        value = float(found["state"])
    except ValueError:  # unknown, unavailable
        return None
    return value


def _entity(platform: str, *parts: str) -> str:
    """The entity id HA makes of the `object_id` the agent sends (HA's slugify)."""
    return f"{platform}." + re.sub(r"[^a-z0-9]+", "_", "_".join(parts).lower()).strip("_")


@dataclass(frozen=True, slots=True)
class Timing:
    steps: dict[str, float]

    def report(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.steps.items())


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
async def test_home_assistant_shows_the_cameras_and_follows_the_agent(
    hass_bin: Path,
    tmp_path: Path,
    own_blobs: dict[str, Path],
    kind: Literal["mosquitto", "embedded"],
) -> None:
    timing: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timing[name] = now - clock
        clock = now

    with contextlib.ExitStack() as stack:
        if kind == "mosquitto":
            if mosquitto_path() is None:
                pytest.skip("mosquitto is not installed")
            try:
                broker = stack.enter_context(run_broker("mosquitto", tmp_path / "broker"))
            except BrokerUnavailable as exc:
                pytest.fail(f"cannot start mosquitto: {exc}")
        else:  # the demo's way: the agent's own amqtt broker, MQTT 3.1.1
            broker = Broker(kind="amqtt", host="127.0.0.1", port=free_port(), pid=0)
        hass = stack.enter_context(running_hass(hass_bin, tmp_path))
        try:
            await hass.started()
            lap("hass start")
            await hass.onboard()
            config = _config(broker, tmp_path / "state", embedded=kind == "embedded")
            await _run(hass, broker, config, own_blobs["ssd_tiny"], lap)
        except BaseException:
            sys.stderr.write(f"\n--- Home Assistant's log ---\n{hass.tail()}\n")
            raise
    sys.stderr.write(f"\nreal Home Assistant ({kind}): {Timing(timing).report()}\n")


def _config(broker: Broker, state_dir: Path, *, embedded: bool) -> Config:
    config = make_config(broker, state_dir)
    config = msgspec.structs.replace(
        config,
        homeassistant=HomeAssistantSection(enabled=True),
        agent=msgspec.structs.replace(config.agent, stats_interval=1.0),
    )
    if embedded:
        mqtt: MqttSection = msgspec.structs.replace(config.mqtt, protocol="3.1.1")
        config = msgspec.structs.replace(config, mqtt=mqtt, broker=BrokerSection(embedded=True))
    return config


async def _run(
    hass: Hass, broker: Broker, config: Config, blob: Path, lap: Callable[[str], None]
) -> None:
    agent = config.agent.id
    state = _entity("sensor", agent, CAM1, "state")
    connectivity = _entity("binary_sensor", agent, "connectivity")
    nn = _entity("sensor", agent, CAM1, "CAM_A", "nn")
    button = _entity("button", agent, CAM1, "CAM_A", "remove_nn")

    async def is_(entity: str, value: str) -> Any:
        found = await hass.state(entity)
        return found if found is not None and found["state"] == value else None

    topics = Topics.for_agent(config.mqtt.prefix, agent)
    # the agent first: with `broker.embedded` it is the broker
    async with running_agent(config), observe(broker, topics) as observer:
        await observer.wait_for(
            lambda: observer.latest(topics.availability) == b"online", what="agent online"
        )
        await hass.add_mqtt(broker)
        lap("mqtt entry")
        # both cameras as devices, with the agent as their hub
        await hass.until("camera state online", lambda: is_(state, "online"))
        second = _entity("sensor", agent, CAM2, "state")
        await hass.until("second camera", lambda: is_(second, "online"))
        await hass.until("agent connected", lambda: is_(connectivity, "on"))
        lap("entities")
        await _device(hass, state, connectivity)
        assert await hass.state(nn) is None  # nothing deployed: no NN entities

        model = await anyio.Path(blob).read_bytes()
        await observer.deploy(
            CAM1,
            "CAM_A",
            {
                "request_id": "real-ha-1",
                "nn_config": {"type": "MobileNet"},
                "model": model,
                "labels": ["background", "person", "car"],
            },
            encoding="msgpack",
        )
        assert (await observer.outcome("real-ha-1")).state == "succeeded"
        running = await hass.until("nn running", lambda: is_(nn, "running"))
        assert running["attributes"]["model_name"] is None  # a deploy without model_name
        assert running["attributes"]["type"] == "MobileNet"
        assert running["attributes"]["request_id"] == "real-ha-1"
        # the simulated camera shows two persons: counts and presence reach HA
        schedule = b'{"frames": [[1, 1]], "loop": false}'
        await observer.send(topics.simulator(CAM1, "objects"), schedule)
        await _counts(hass, agent)
        await _health(hass, agent)
        lap("deploy seen")

        # the dashboard's remove button: HA publishes a delete, the agent carries it out
        await hass.call("POST", "/api/services/button/press", {"entity_id": button})
        deleted = await observer.wait_for(
            lambda: next(
                (e for e in observer.events() if e.action == "delete" and e.terminal), None
            ),
            what="a delete from Home Assistant",
        )
        assert deleted.request_id.startswith("homeassistant-")
        assert deleted.state == "succeeded"

        async def gone() -> bool:
            return await hass.state(nn) is None and await hass.state(button) is None

        await hass.until("the NN's entities removed", gone)
        lap("button")
        # an unplugged camera: its entities unavailable while the agent stays connected
        await observer.send(topics.simulator(CAM2, "unplug"), b"")
        await hass.until("unplugged camera unavailable", lambda: is_(second, "unavailable"))
        assert await is_(connectivity, "on")
        assert await is_(state, "online")
        lap("unplug seen")
    # the agent stopped (its broker too, when embedded): everything it made is unavailable
    await hass.until("camera unavailable", lambda: is_(state, "unavailable"))
    lap("stop seen")
