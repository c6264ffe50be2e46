"""Home Assistant MQTT discovery: every payload schema-valid, ids stable, configs following
the agent's NNs on a real broker, HA's birth message answered, ghosts cleared.

The run against a real Home Assistant is tests/test_homeassistant_real.py (marker
`homeassistant`, not run by default).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import anyio
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import (
    ConfigError,
    HomeAssistantSection,
    SecurityKey,
    SecuritySection,
    load_config,
)
from agent.connect import BrokerOptions
from agent.homeassistant import (
    ORIGIN_NAME,
    CameraView,
    Discovery,
    StreamView,
    label_slugs,
)
from agent.retained import collect_retained
from agent.signing import public_key_text
from agent.topics import DiscoveryTopics, Topics
from tests.brokers import free_port
from tests.ha_schema import NODE, BinarySensor, Button, Removal, Sensor, decode_config
from tests.harness import CAM1, CAM2, WAIT, agent_and_observer, make_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from agent.config import Config
    from tests.brokers import Broker
    from tests.harness import Observer

AGENT = "demo"
STREAMS = ("CAM_A", "CAM_B", "CAM_C", "DEPTH_B_C")
MXIDS = st.from_regex(r"[A-Z0-9]{1,64}", fullmatch=True)
AGENT_IDS = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
LABELS = st.lists(st.text(min_size=1, max_size=40), max_size=30)


def _discovery(agent_id: str = AGENT, labels: tuple[str, ...] | None = None) -> Discovery:
    return Discovery(
        topics=Topics.for_agent("oak", agent_id),
        discovery=DiscoveryTopics("homeassistant"),
        agent_id=agent_id,
        version="0.1.0",
        labels=labels,
    )


def _camera(mxid: str = CAM1, **nns: StreamView) -> CameraView:
    return CameraView(
        mxid=mxid, name="front-door", product="OAK (simulated)", firmware=None, nns=nns
    )


def _unique_ids(components: dict[str, Any]) -> set[str]:
    return {c.uniq_id for c in components.values() if not isinstance(c, Removal)}


# --- the payloads: schema, ids ---------------------------------------------------------------


streams = st.dictionaries(
    st.sampled_from(STREAMS),
    st.builds(
        StreamView,
        type=st.sampled_from(["YOLO", "MobileNet", "Generic", None]),
        labels=st.none() | LABELS.map(tuple),
    ),
)


@settings(max_examples=300)
@given(
    agent_id=AGENT_IDS,
    mxid=MXIDS,
    name=st.text(max_size=80),
    firmware=st.none() | st.text(min_size=1, max_size=20),
    nns=streams,
    configured=st.none() | st.lists(st.text(min_size=1, max_size=20), max_size=20).map(tuple),
    gone=st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True),
        st.sampled_from(["sensor", "binary_sensor", "button"]),
        max_size=5,
    ),
)
def test_every_payload_is_one_home_assistant_accepts(
    agent_id: str,
    mxid: str,
    name: str,
    firmware: str | None,
    nns: dict[str, StreamView],
    configured: tuple[str, ...] | None,
    gone: dict[str, str],
) -> None:
    discovery = _discovery(agent_id, configured)
    camera = CameraView(mxid=mxid, name=name, product="OAK-D", firmware=firmware, nns=nns)
    topics = {discovery.agent_topic, discovery.camera_topic(mxid)}
    seen: set[str] = set()
    for topic, payload in (
        (discovery.agent_topic, discovery.agent_config(gone)),
        (discovery.camera_topic(mxid), discovery.camera_config(camera, gone)),
    ):
        node = topic.split("/")[-2]
        assert NODE.fullmatch(node), topic
        config, components = decode_config(payload)
        unique = _unique_ids(components)
        assert not unique & seen, "unique_ids repeat across devices"
        seen |= unique
        assert config.o is not None
        assert config.o.name == ORIGIN_NAME
        # a removal stub never hides a component that is there
        for key, platform in gone.items():
            if isinstance(components.get(key), Removal):
                assert components[key] == Removal(p=platform)  # type: ignore[arg-type]
        assert discovery.owned(topic, payload) is not None
    assert len(topics) == 2


def test_unique_ids_are_built_as_the_issue_says() -> None:
    discovery = _discovery()
    camera = _camera(
        CAM1,
        CAM_A=StreamView("YOLO", ("person", "car", "traffic light")),
        DEPTH_B_C=StreamView("Generic"),
    )
    _, components = decode_config(discovery.camera_config(camera))
    _, agent = decode_config(discovery.agent_config())
    base = f"{AGENT}_{CAM1}"
    assert _unique_ids(components) == {
        f"{base}_state",
        f"{base}_restarts",
        f"{base}_last_error",
        f"{base}_temperature",
        *(f"{base}_temperature_{chip}" for chip in ("css", "mss", "upa", "dss")),
        *(f"{base}_memory_{m}" for m in ("ddr", "cmx", "leon_css_heap", "leon_mss_heap")),
        f"{base}_leon_css_cpu",
        f"{base}_leon_mss_cpu",
        f"{base}_CAM_A_nn",
        f"{base}_CAM_A_objects",
        f"{base}_CAM_A_remove_nn",
        f"{base}_CAM_A_fps",
        f"{base}_CAM_A_person_count",
        f"{base}_CAM_A_person_present",
        f"{base}_CAM_A_car_count",
        f"{base}_CAM_A_car_present",
        f"{base}_CAM_A_traffic_light_count",
        f"{base}_CAM_A_traffic_light_present",
        # a Generic network: state, remove and rate, but nothing counted
        f"{base}_DEPTH_B_C_nn",
        f"{base}_DEPTH_B_C_remove_nn",
        f"{base}_DEPTH_B_C_fps",
    }
    assert _unique_ids(agent) == {
        f"{AGENT}_{key}"
        for key in ("connectivity", "version", "cameras", "detections_dropped", "cpu", "rss")
    }
    present = components["CAM_A_person_present"]
    assert isinstance(present, BinarySensor)
    assert present.dev_cla == "occupancy"
    temperature = components["temperature"]
    assert isinstance(temperature, Sensor)
    assert (temperature.dev_cla, temperature.unit_of_meas) == ("temperature", "°C")
    assert temperature.ent_cat == "diagnostic"
    state = components["state"]
    assert isinstance(state, Sensor)
    assert state.ops == ["online", "restarting", "offline"]
    button = components["CAM_A_remove_nn"]
    assert isinstance(button, Button)
    assert button.cmd_t == f"oak/{AGENT}/cameras/{CAM1}/streams/CAM_A/nn/delete"
    config, _ = decode_config(discovery.camera_config(camera))
    assert config.avty_mode == "all"
    assert [a.t for a in config.avty or []] == [
        f"oak/{AGENT}/availability",
        f"oak/{AGENT}/cameras/{CAM1}/availability",
    ]
    assert config.dev is not None
    assert (config.dev.mf, config.dev.mdl, config.dev.sn) == ("Luxonis", "OAK (simulated)", CAM1)
    assert config.dev.via_device == f"oak_{AGENT}_agent"


def test_configured_labels_narrow_the_deploys_labels_and_at_most_twenty() -> None:
    many = tuple(f"class {i}" for i in range(50))
    assert len(label_slugs(StreamView("YOLO", many), None)) == 20
    narrowed = label_slugs(StreamView("YOLO", ("person", "car", "dog")), ("dog", "person", "x"))
    assert narrowed == [("person", "person"), ("dog", "dog")]
    assert label_slugs(StreamView("YOLO", ("Person", "person", "?!")), None) == [
        ("Person", "person"),
        ("?!", "label_2"),
    ]
    assert label_slugs(StreamView("Generic", ("person",)), None) == []
    assert label_slugs(StreamView("MobileNet", None), None) == []


def test_removed_components_are_sent_as_their_platform_only() -> None:
    discovery = _discovery()
    gone = {"CAM_A_nn": "sensor", "CAM_A_person_present": "binary_sensor", "state": "sensor"}
    _, components = decode_config(discovery.camera_config(_camera(), gone))
    assert components["CAM_A_nn"] == Removal(p="sensor")
    assert components["CAM_A_person_present"] == Removal(p="binary_sensor")
    # a component that is there again wins over its stub
    assert isinstance(components["state"], Sensor)


def test_only_this_agents_configs_are_its_own() -> None:
    mine, other = _discovery("a"), _discovery("a_B")
    camera = _camera("C")
    assert mine.owned(mine.camera_topic("C"), mine.camera_config(camera)) is not None
    # agent "a_B"'s camera C has the identifier oak_a_B_C: not agent "a"'s camera "B_C"
    assert mine.owned(other.camera_topic("C"), other.camera_config(camera)) is None
    assert mine.owned(other.agent_topic, other.agent_config()) is None
    assert other.owned(mine.agent_topic, mine.agent_config()) is None
    foreign = msgspec.json.encode({"dev": {"ids": ["oak_a_C"]}, "o": {"name": "z2m"}, "cmps": {}})
    assert mine.owned(mine.camera_topic("C"), foreign) is None
    assert mine.owned(mine.camera_topic("C"), b"not json") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=300)
@given(
    payload=st.one_of(
        st.binary(max_size=200),
        json_values.map(msgspec.json.encode),
        st.fixed_dictionaries(
            {
                "dev": st.fixed_dictionaries({"ids": st.just(["oak_demo_AB1"]) | json_values}),
                "o": st.fixed_dictionaries({"name": st.just(ORIGIN_NAME) | st.text()}),
                "cmps": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
            }
        ).map(msgspec.json.encode),
    ),
    node=st.sampled_from(["oak_demo_AB1", "oak_demo_agent", "x", ""]),
)
def test_any_retained_config_is_read_without_raising(payload: bytes, node: str) -> None:
    discovery = _discovery()
    owned = discovery.owned(f"homeassistant/device/{node}/config", payload)
    if owned is not None:
        assert owned.node == node
        assert owned.mxid in (None, "AB1")
        assert set(owned.stubs) <= set(owned.components)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[homeassistant]\nenabled = true\nsurprise = 1\n", "surprise"),
        ('[homeassistant]\ndiscovery_prefix = "home/+"\n', "discovery_prefix"),
        (
            "[homeassistant]\nlabels = [" + ", ".join(f'"l{i}"' for i in range(21)) + "]\n",
            "labels",
        ),
    ],
)
def test_config_rejects_bad_homeassistant_sections(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config(path)


# --- on a real broker -----------------------------------------------------------------------


@dataclass
class Retained:
    """Everything published under the discovery prefix, as it arrives."""

    client: aiomqtt.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def _record(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.messages.append((message.topic.value, payload))
            self._changed.set()
            self._changed = anyio.Event()

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload in self.messages if t == topic]

    def latest(self, topic: str) -> bytes | None:
        found = self.on(topic)
        return found[-1] if found else None

    async def wait_for(self, check: Callable[[], bool], what: str) -> None:
        with anyio.fail_after(WAIT):
            while True:
                changed = self._changed
                if check():
                    return
                await changed.wait()
        raise AssertionError(what)  # pragma: no cover


@contextlib.asynccontextmanager
async def watch_discovery(broker: Broker, prefix: str) -> AsyncIterator[Retained]:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"ha-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        retained = Retained(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(retained._record)
            yield retained
            tg.cancel_scope.cancel()


def _ha_config(broker: Broker, state_dir: Path, **options: Any) -> tuple[Config, Discovery]:
    config = make_config(broker, state_dir)
    prefix = f"ha{uuid.uuid4().hex[:8]}"
    section = HomeAssistantSection(enabled=True, discovery_prefix=prefix, **options)
    config = msgspec.structs.replace(config, homeassistant=section)
    discovery = Discovery(
        topics=Topics.for_agent(config.mqtt.prefix, config.agent.id),
        discovery=DiscoveryTopics(prefix),
        agent_id=config.agent.id,
        version="x",
        labels=section.labels,
    )
    return config, discovery


def _components(payload: bytes | None) -> dict[str, Any]:
    if not payload:
        return {}
    return decode_config(payload)[1]


def _has(retained: Retained, topic: str, key: str, kind: type) -> Callable[[], bool]:
    return lambda: isinstance(_components(retained.latest(topic)).get(key), kind)


async def _deploy(observer: Observer, blob: Path, request_id: str, labels: list[str]) -> None:
    model = await anyio.Path(blob).read_bytes()
    await observer.deploy(
        CAM1,
        "CAM_A",
        {
            "request_id": request_id,
            "nn_config": {"type": "MobileNet"},
            "model": model,
            "labels": labels,
        },
        encoding="msgpack",
    )
    assert (await observer.outcome(request_id)).state == "succeeded"


@pytest.mark.anyio
async def test_discovery_follows_deploy_labels_and_delete(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    prefix = config.homeassistant.discovery_prefix
    camera_topic = discovery.camera_topic(CAM1)
    async with (
        watch_discovery(broker, prefix) as retained,
        agent_and_observer(broker, config) as (app, observer),
    ):
        await retained.wait_for(_has(retained, camera_topic, "state", Sensor), "camera device")
        await retained.wait_for(
            _has(retained, discovery.camera_topic(CAM2), "state", Sensor), "second camera"
        )
        await retained.wait_for(
            _has(retained, discovery.agent_topic, "connectivity", BinarySensor), "agent device"
        )
        assert "CAM_A_nn" not in _components(retained.latest(camera_topic))

        await _deploy(observer, own_blobs["ssd_tiny"], "ha-1", ["background", "person", "car"])
        await retained.wait_for(
            _has(retained, camera_topic, "CAM_A_car_present", BinarySensor), "label entities"
        )
        components = _components(retained.latest(camera_topic))
        for key in ("CAM_A_nn", "CAM_A_objects", "CAM_A_person_count", "CAM_A_remove_nn"):
            assert not isinstance(components[key], Removal), key

        # new labels: car goes, dog comes, without a restart
        await _deploy(observer, own_blobs["ssd_tiny"], "ha-2", ["background", "person", "dog"])
        await retained.wait_for(
            _has(retained, camera_topic, "CAM_A_dog_count", Sensor), "the new label"
        )
        components = _components(retained.latest(camera_topic))
        assert components["CAM_A_car_present"] == Removal(p="binary_sensor")
        assert components["CAM_A_car_count"] == Removal(p="sensor")

        await observer.delete(CAM1, "CAM_A", {"request_id": "ha-3"})
        assert (await observer.outcome("ha-3")).state == "succeeded"
        await retained.wait_for(
            _has(retained, camera_topic, "CAM_A_nn", Removal), "the NN's entities removed"
        )
        components = _components(retained.latest(camera_topic))
        stream_keys = [key for key in components if key.startswith("CAM_A_")]
        assert stream_keys
        assert all(isinstance(components[key], Removal) for key in stream_keys)
        assert isinstance(components["state"], Sensor)  # the device stays
        assert app.homeassistant is not None


@pytest.mark.anyio
async def test_the_remove_button_deletes_the_nn(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    camera_topic = discovery.camera_topic(CAM1)
    async with (
        watch_discovery(broker, config.homeassistant.discovery_prefix) as retained,
        agent_and_observer(broker, config) as (_, observer),
    ):
        await _deploy(observer, own_blobs["ssd_tiny"], "rb-1", ["background", "person"])
        await retained.wait_for(_has(retained, camera_topic, "CAM_A_remove_nn", Button), "button")
        button = _components(retained.latest(camera_topic))["CAM_A_remove_nn"]
        # what HA publishes on a press: the command template rendered
        assert button.cmd_tpl == '{"request_id": "homeassistant-{{ now().timestamp() }}"}'
        await observer.send(button.cmd_t, b'{"request_id": "homeassistant-1795736466.5"}')
        event = await observer.outcome("homeassistant-1795736466.5")
        assert (event.action, event.state) == ("delete", "succeeded")
        nn = observer.topics.nn_status(CAM1, "CAM_A")
        await observer.wait_for(
            lambda: (observer.latest_json(nn) or {}).get("state") == "none", what="nn none"
        )


@pytest.mark.anyio
async def test_the_remove_button_is_refused_when_commands_must_be_signed(
    broker: Broker, tmp_path: Path
) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    key = Ed25519PrivateKey.generate().public_key()
    security = SecuritySection(
        require_signed=True, keys=(SecurityKey(id="ops", public_key=public_key_text(key)),)
    )
    config = msgspec.structs.replace(config, security=security)
    camera_topic = discovery.camera_topic(CAM1)
    async with (
        watch_discovery(broker, config.homeassistant.discovery_prefix) as retained,
        agent_and_observer(broker, config) as (_, observer),
    ):
        await retained.wait_for(_has(retained, camera_topic, "state", Sensor), "camera device")
        # the button HA shows once an NN runs publishes exactly this, unsigned
        delete = observer.topics.command(CAM1, "CAM_A", "delete")
        await observer.send(delete, b'{"request_id": "homeassistant-1795736467.25"}')
        event = await observer.outcome("homeassistant-1795736467.25")
        assert event.state == "rejected"
        assert event.error is not None
        assert event.error.code == "unauthorized"


@pytest.mark.anyio
async def test_an_unplugged_camera_keeps_its_device(broker: Broker, tmp_path: Path) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    camera_topic = discovery.camera_topic(CAM2)
    async with (
        watch_discovery(broker, config.homeassistant.discovery_prefix) as retained,
        agent_and_observer(broker, config) as (_, observer),
    ):
        await retained.wait_for(_has(retained, camera_topic, "state", Sensor), "camera device")
        before = retained.latest(camera_topic)
        availability = observer.topics.camera_availability(CAM2)
        await observer.send(observer.topics.simulator(CAM2, "unplug"), b"")
        await observer.wait_for(lambda: observer.latest(availability) == b"offline", what="off")
        status = observer.topics.camera_status(CAM2)
        await observer.wait_for(
            lambda: (observer.latest_json(status) or {}).get("state") == "offline", what="status"
        )
        # its entities go unavailable through the camera's availability; the device stays
        config_now = decode_config(retained.latest(camera_topic) or b"")[0]
        assert [a.t for a in config_now.avty or []][1] == availability
        assert retained.latest(camera_topic) == before
        assert b"" not in retained.on(camera_topic)


@pytest.mark.anyio
async def test_birth_message_republishes_discovery_and_state(
    broker: Broker, tmp_path: Path
) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    prefix = config.homeassistant.discovery_prefix
    async with (
        watch_discovery(broker, prefix) as retained,
        agent_and_observer(broker, config) as (app, observer),
    ):
        assert app.homeassistant is not None
        await retained.wait_for(
            _has(retained, discovery.camera_topic(CAM2), "state", Sensor), "discovery"
        )
        configs = len(retained.on(discovery.agent_topic))
        infos = len(observer.on(observer.topics.info))
        await retained.client.publish(f"{prefix}/status", b"online", qos=1)
        await retained.wait_for(
            lambda: len(retained.on(discovery.agent_topic)) > configs, "discovery again"
        )
        await observer.wait_for(
            lambda: len(observer.on(observer.topics.info)) > infos, what="state again"
        )
        # `offline` (HA's will) asks for nothing
        configs = len(retained.on(discovery.agent_topic))
        await retained.client.publish(f"{prefix}/status", b"offline", qos=1)
        await retained.client.publish(f"{prefix}/status", b"online", qos=1)
        await retained.wait_for(
            lambda: len(retained.on(discovery.agent_topic)) == configs + 1, "one answer"
        )


@pytest.mark.anyio
async def test_startup_clears_ghosts_and_stale_entities_of_this_agent_only(
    broker: Broker, tmp_path: Path
) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    prefix = config.homeassistant.discovery_prefix
    other = Discovery(
        topics=Topics.for_agent("oaktest", f"{config.agent.id}_X"),
        discovery=DiscoveryTopics(prefix),
        agent_id=f"{config.agent.id}_X",
        version="x",
    )
    ghost = _camera("GHOST1")
    stale = _camera(CAM1, CAM_B=StreamView("YOLO", ("person",)))
    planted = {
        discovery.camera_topic("GHOST1"): discovery.camera_config(ghost),
        discovery.camera_topic(CAM1): discovery.camera_config(stale),
        other.camera_topic("GHOST1"): other.camera_config(ghost),  # another agent's
    }
    async with watch_discovery(broker, prefix) as retained:
        for topic, payload in planted.items():
            await retained.client.publish(topic, payload, qos=1, retain=True)
        await retained.wait_for(lambda: len(retained.messages) == len(planted), "planted")
        async with agent_and_observer(broker, config) as (app, _):
            ghost_topic = discovery.camera_topic("GHOST1")
            await retained.wait_for(lambda: retained.latest(ghost_topic) == b"", "ghost cleared")
            camera_topic = discovery.camera_topic(CAM1)
            await retained.wait_for(
                _has(retained, camera_topic, "CAM_B_person_present", Removal), "stale removed"
            )
            components = _components(retained.latest(camera_topic))
            assert components["CAM_B_nn"] == Removal(p="sensor")
            assert isinstance(components["state"], Sensor)
            assert app.homeassistant is not None
            with anyio.fail_after(WAIT):
                await app.homeassistant.scanned.wait()
        assert retained.on(other.camera_topic("GHOST1")) == [planted[other.camera_topic("GHOST1")]]
        await retained.client.publish(other.camera_topic("GHOST1"), b"", qos=1, retain=True)


@pytest.mark.anyio
async def test_unique_ids_are_stable_across_restarts(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    config, discovery = _ha_config(broker, tmp_path / "state")
    prefix = config.homeassistant.discovery_prefix
    camera_topic = discovery.camera_topic(CAM1)
    seen: list[set[str]] = []
    for run in range(2):
        async with (
            watch_discovery(broker, prefix) as retained,
            agent_and_observer(broker, config) as (_, observer),
        ):
            if run == 0:
                await _deploy(observer, own_blobs["ssd_tiny"], "st-1", ["background", "person"])
            await retained.wait_for(
                _has(retained, camera_topic, "CAM_A_person_present", BinarySensor), "restored"
            )
            seen.append(
                _unique_ids(_components(retained.latest(camera_topic)))
                | _unique_ids(_components(retained.latest(discovery.agent_topic)))
            )
    assert seen[0] == seen[1]
    assert f"{config.agent.id}_{CAM1}_CAM_A_person_present" in seen[0]


# --- the README's Home Assistant steps, run as a user runs them --------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _readme_blocks(heading: str) -> list[list[str]]:
    """The commands of each sh block of the README section `heading` (comments skipped)."""
    section = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in section.split("```sh\n")[1:]:
        lines = block.split("\n```", 1)[0].splitlines()
        blocks.append([line for line in lines if line.strip() and not line.startswith("#")])
    return blocks


@pytest.mark.anyio
async def test_the_readme_home_assistant_steps_work_as_written(tmp_path: Path) -> None:
    (enable, demo), (status,) = _readme_blocks("## Home Assistant")
    assert demo == "scripts/demo"  # runs `oak-agent run --config config/demo.toml`
    port = free_port()
    config = tmp_path / "demo.toml"
    text = (ROOT / "config" / "demo.toml").read_text()
    config.write_text(
        text.replace("port = 1883", f"port = {port}").replace(
            '"../.state/demo"', f'"{tmp_path / "state"}"'
        )
    )
    enabled = await anyio.run_process(
        ["bash", "-c", enable.replace("config/demo.toml", str(config))], cwd=ROOT
    )
    assert enabled.returncode == 0
    assert load_config(config).homeassistant.enabled
    log = (tmp_path / "agent.log").open("wb")
    agent = await anyio.open_process(
        [sys.executable, "-m", "agent.cli", "--log-format", "json", "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    try:
        broker = BrokerOptions(host="127.0.0.1", port=port)
        with anyio.fail_after(WAIT):
            while True:  # the embedded broker comes up with the agent
                with contextlib.suppress(OSError):
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                await anyio.sleep(0.05)
        discovery = Discovery(
            topics=Topics.for_agent("oak", "demo"),
            discovery=DiscoveryTopics("homeassistant"),
            agent_id="demo",
            version="x",
        )
        wanted = {discovery.agent_topic, discovery.camera_topic(CAM1), discovery.camera_topic(CAM2)}
        with anyio.fail_after(WAIT):
            while True:
                found = await collect_retained(
                    broker, ("homeassistant/device/+/config",), quiet=0.5
                )
                if wanted <= set(found):
                    break
        for topic in wanted:
            decode_config(found[topic])
        shown = await anyio.run_process(
            ["bash", "-c", status.replace("config/demo.toml", str(config))], cwd=ROOT, check=False
        )
    finally:
        agent.terminate()
        with anyio.fail_after(WAIT):
            await agent.wait()
        log.close()
    assert shown.returncode == 0, shown
    lines = shown.stdout.decode().splitlines()
    assert lines[0].split()[0] == "AGENT"
    assert any("front-door (14442C10D13EABCE00)" in line for line in lines)
    assert any("loading-bay (18443010C1E1D31200)" in line for line in lines)
