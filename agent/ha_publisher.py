"""Keeps Home Assistant's discovery configs in step with the agent (agent/homeassistant.py
builds them): republished as NNs come and go, removal stubs for entities that no longer
apply, everything again after HA's birth message, and at start-up this agent's retained
configs that no longer apply (ghosts) cleared.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Final, Protocol

import aiomqtt
import anyio
import structlog

from agent.homeassistant import CameraView, StreamView
from agent.retained import collect_retained

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from anyio.abc import TaskStatus

    from agent.cameras.base import Camera
    from agent.connect import BrokerOptions
    from agent.homeassistant import Component, Discovery
    from agent.messages import Info, NNStatus
    from agent.topics import DiscoveryTopics

__all__ = ["HomeAssistant", "Republisher"]

log = structlog.get_logger(__name__)

BIRTH_DELAY: Final = (0.5, 3.0)  # seconds, random: HA's docs ask publishers not to answer at once
_SCAN_QUIET: Final = 1.0  # a retained-config scan ends after this long without a message
_SCAN_LIMIT: Final = 15.0  # ... or after this long in all
_SCAN_ATTEMPTS: Final = 5
_SCAN_RETRY: Final = 2.0


class Republisher(Protocol):
    """What the publisher needs of the MQTT link."""

    def retain(self, topic: str, payload: bytes) -> None:
        """Set the retained state of `topic`; the latest value wins."""

    def republish_retained(self) -> None:
        """Publish every retained topic again."""


class HomeAssistant:
    """The agent's side of Home Assistant MQTT discovery."""

    def __init__(
        self,
        link: Republisher,
        discovery: Discovery,
        topics: DiscoveryTopics,
        *,
        cameras: Callable[[], Mapping[str, Camera]],
        saved_cameras: Callable[[], set[str]],
        broker: BrokerOptions | None,
        client_id: str,
        birth_delay: tuple[float, float] = BIRTH_DELAY,
    ) -> None:
        self._link = link
        self._discovery = discovery
        self._topics = topics
        self._cameras = cameras
        self._saved_cameras = saved_cameras  # cameras the state file knows, present or not
        self._broker = broker
        self._client_id = client_id
        self._birth_delay = birth_delay
        self._nns: dict[str, dict[str, StreamView]] = {}  # camera -> stream -> its NN
        self._published: dict[str, dict[str, str]] = {}  # config topic -> id -> platform
        self._gone: dict[str, dict[str, str]] = {}  # config topic -> removed id -> platform
        self._birth = anyio.Event()
        self.scanned = anyio.Event()  # set once the start-up scan for ghosts is done

    @property
    def birth_topic(self) -> str:
        return self._topics.birth

    # --- what the reporter tells -------------------------------------------------------

    def info(self, info: Info) -> None:
        """The agent's info was published: its cameras may have changed."""
        del info  # the cameras come from the backend, which knows their product names
        self.publish_all()

    def nn_status(self, camera: str, stream: str, status: NNStatus) -> None:
        nns = self._nns.setdefault(camera, {})
        if status.state == "none":
            nns.pop(stream, None)
        else:
            kind = None
            if status.nn_config is not None:
                kind = str(type(status.nn_config).__struct_config__.tag)
            nns[stream] = StreamView(type=kind, labels=status.labels)
        device = self._cameras().get(camera)
        if device is not None:
            self._publish_camera(device)

    def on_birth(self, payload: bytes) -> None:
        """A message on HA's status topic: `online` means HA (re)started."""
        if payload.strip() == b"online":
            self._birth.set()

    # --- publishing --------------------------------------------------------------------

    def publish_all(self) -> None:
        topic = self._discovery.agent_topic
        current = _platforms(self._discovery.agent_components())
        self._link.retain(topic, self._discovery.agent_config(self._removed(topic, current)))
        for camera in self._cameras().values():
            self._publish_camera(camera)

    def _publish_camera(self, camera: Camera) -> None:
        view = CameraView(
            mxid=camera.mxid,
            name=camera.name,
            product=camera.product,
            firmware=camera.firmware,
            nns=dict(self._nns.get(camera.mxid, {})),
        )
        topic = self._discovery.camera_topic(camera.mxid)
        current = _platforms(self._discovery.camera_components(view))
        self._link.retain(topic, self._discovery.camera_config(view, self._removed(topic, current)))

    def _removed(self, topic: str, current: dict[str, str]) -> dict[str, str]:
        """The removal stubs to publish with `current`: what was published and is no more.

        Kept for as long as the agent runs, so a HA that reads the config later still
        removes those entities; a component that comes back drops its stub.
        """
        gone = self._gone.setdefault(topic, {})
        for key, platform in self._published.get(topic, {}).items():
            if key not in current:
                gone[key] = platform
        for key in current:
            gone.pop(key, None)
        self._published[topic] = current
        return gone

    def _retire(self, topic: str, components: Mapping[str, str]) -> None:
        """Components a retained config holds and the current one lacks: remove them."""
        gone = self._gone.setdefault(topic, {})
        for key, platform in components.items():
            if key not in self._published.get(topic, {}):
                gone[key] = platform

    # --- the long-running part ---------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer HA's birth messages; clear ghosts once at start. Until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._scan, name="homeassistant.scan")
            task_status.started()
            while True:
                await self._birth.wait()
                self._birth = anyio.Event()
                await anyio.sleep(random.uniform(*self._birth_delay))  # noqa: S311  # jitter
                log.info("home assistant restarted: discovery and state published again")
                self.publish_all()
                self._link.republish_retained()

    async def _scan(self) -> None:
        try:
            if self._broker is None:
                return
            for attempt in range(1, _SCAN_ATTEMPTS + 1):
                try:
                    found = await collect_retained(
                        self._broker,
                        (self._topics.device_filter,),
                        quiet=_SCAN_QUIET,
                        limit=_SCAN_LIMIT,
                        client_prefix=f"{self._client_id}-ha-scan",
                    )
                except (aiomqtt.MqttError, OSError) as exc:
                    log.warning(
                        "cannot read the retained discovery configs",
                        error=str(exc),
                        attempt=attempt,
                    )
                    await anyio.sleep(_SCAN_RETRY * attempt)
                    continue
                self._clear_ghosts(found)
                return
        finally:
            self.scanned.set()

    def _clear_ghosts(self, found: Mapping[str, bytes]) -> None:
        cameras = self._cameras()
        republish = False
        for topic, payload in found.items():
            owned = self._discovery.owned(topic, payload)
            if owned is None:
                continue
            if owned.mxid is None or owned.mxid in cameras:
                stale = self._discovery.stale(owned, self._published.get(topic, {}))
                if stale:
                    self._retire(topic, stale)
                    republish = True
                    log.info("stale home assistant entities removed", topic=topic, ids=list(stale))
            elif owned.mxid not in self._saved_cameras():
                self._link.retain(topic, b"")
                log.info("ghost home assistant device cleared", topic=topic, camera=owned.mxid)
        if republish:
            self.publish_all()


def _platforms(components: Mapping[str, Component]) -> dict[str, str]:
    return {key: component.platform for key, component in components.items()}
