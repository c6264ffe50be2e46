"""Composition root: builds the objects, runs the root task group, shuts down cleanly."""

from __future__ import annotations

import shlex
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import msgspec
import structlog

from agent import __version__
from agent.audit import AuditLog
from agent.cameras.simulator import SimulatorBackend
from agent.commands import CommandHandler
from agent.config import Config, DepthaiSection
from agent.connect import broker_options
from agent.coordinator import Coordinator
from agent.errors import ModelWriteFailed
from agent.ha_publisher import HomeAssistant
from agent.health import HealthMonitor
from agent.homeassistant import Discovery
from agent.intake import Intake
from agent.messages import Info, InfoCamera, LinkCounters
from agent.models import ModelStore
from agent.mqtt import MqttLink
from agent.reporter import Reporter
from agent.signing import Policy
from agent.state import StateFile
from agent.topics import DiscoveryTopics, Topics
from agent.transfers import Transfers
from agent.uploads import Uploads

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from agent.cameras.base import CameraBackend, Output
    from agent.connect import BrokerOptions
    from agent.inbox import Inbound, Receipt

__all__ = ["App", "serve"]

log = structlog.get_logger(__name__)


class _Listener:
    """Routes what the camera backend reports to the reporter and the camera workers."""

    def __init__(
        self,
        config: Config,
        backend: CameraBackend,
        coordinator: Coordinator,
        reporter: Reporter,
        link: Callable[[], LinkCounters],
    ) -> None:
        self._config = config
        self._backend = backend
        self._coordinator = coordinator
        self._reporter = reporter
        self._link = link
        self._started_at = time.time()

    def on_output(self, output: Output) -> None:
        self._reporter.on_output(output)

    def publish_info(self) -> None:
        self._reporter.info(_info(self._config, self._backend, self._started_at, self._link()))

    def on_presence(self, camera: str, present: bool) -> None:
        if self._coordinator.presence_changed(self._backend.cameras[camera]):
            self.publish_info()  # a camera that appeared while running
        log.info("camera presence", camera=camera, present=present)


_SHAPING_TICK: Final = 0.1


async def _shaping_clock(reporter: Reporter) -> None:
    """Presence times out and held-back counts go out even when no frame comes."""
    while True:
        await anyio.sleep(_SHAPING_TICK)
        reporter.tick(time.monotonic())


@dataclass(frozen=True, slots=True)
class App:
    """Handles to the running agent's parts, for the CLI and the benchmarks."""

    config: Config
    topics: Topics
    link: MqttLink
    coordinator: Coordinator
    backend: CameraBackend
    reporter: Reporter
    hints: dict[str, str]
    audit: AuditLog
    uploads: Uploads | None = None
    homeassistant: HomeAssistant | None = None


def _backend(config: Config) -> CameraBackend:
    if config.simulator is not None:
        return SimulatorBackend(config.simulator.cameras)
    from agent.cameras.depthai import DepthaiBackend  # noqa: PLC0415  # only for real cameras

    return DepthaiBackend(config.depthai or DepthaiSection())


def _info(config: Config, backend: CameraBackend, started_at: float, link: LinkCounters) -> Info:
    return Info(
        agent_id=config.agent.id,
        version=__version__,
        depthai_version=version("depthai"),
        backend=backend.name,
        cameras=tuple(
            InfoCamera(mxid=c.mxid, name=c.name, streams=c.streams, stats=c.stats)
            for c in backend.cameras.values()
        ),
        started_at=started_at,
        link=link,
        groups=config.agent.groups,
    )


_DEMO_BLOB = Path(__file__).resolve().parent.parent / "tests" / "data" / "blobs" / "ssd_tiny.blob"


def _pasteable(path: Path) -> str:
    """A path that works when pasted in the current folder: relative below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _hints(
    config: Config, topics: Topics, backend: CameraBackend, source: Path | None
) -> dict[str, str]:
    """Copy-paste commands for a first try, shown at start-up (cli.py decides how)."""
    camera = next(iter(backend.cameras.values()), None)
    mxid = camera.mxid if camera else "MXID"
    where = f"-h {config.mqtt.host} -p {config.mqtt.port}"
    if source is not None:
        reach = f"--config {shlex.quote(_pasteable(source.absolute()))}"
    else:
        reach = f"--host {config.mqtt.host} --port {config.mqtt.port} "
        reach += f"--prefix {config.mqtt.prefix} --agent {config.agent.id}"
    argv0 = Path(sys.argv[0])
    program = shlex.quote(
        _pasteable(argv0.absolute()) if argv0.name == "oak-agent" else sys.executable
    )
    if argv0.name != "oak-agent":
        program += " -m agent.cli"
    blob = shlex.quote(_pasteable(_DEMO_BLOB)) if _DEMO_BLOB.is_file() else "MODEL.blob"
    target = f"--camera {mxid} --stream CAM_A"
    return {
        "watch": f"{program} watch {reach}",
        "deploy": (
            f"{program} deploy {reach} {target} --model {blob} "
            '--nn-config \'{"type": "MobileNet"}\''
        ),
        "delete": f"{program} delete {reach} {target}",
        "deploy_with_mosquitto_pub": (
            f"mosquitto_pub {where} -q 1 -t '{topics.command(mxid, 'CAM_A', 'deploy')}' -m "
            f'"{{\\"nn_config\\": {{\\"type\\": \\"MobileNet\\"}}, \\"model\\": '
            f'\\"$(base64 -w0 {blob})\\"}}"'
        ),
    }


def _router(
    intake: Intake, homeassistant: HomeAssistant | None
) -> Callable[[Inbound, Receipt], None]:
    """HA's birth message to the discovery publisher; everything else is a command."""
    if homeassistant is None:
        return intake.receive
    birth = homeassistant.birth_topic

    def receive(message: Inbound, receipt: Receipt) -> None:
        if message.topic != birth:
            intake.receive(message, receipt)
            return
        receipt.settle()
        receipt.release()
        homeassistant.on_birth(message.payload)

    return receive


def _subscriptions(config: Config, topics: Topics, *, simulated: bool) -> tuple[str, ...]:
    """Commands (the agent's and its groups'), uploads and stats requests; the simulator's
    knobs and HA's birth when used."""
    subscriptions: tuple[str, ...] = (
        *topics.command_filters,
        *topics.group_command_filters,
        *topics.upload_filters,
        topics.stats_request,
    )
    if simulated:
        subscriptions = (*subscriptions, topics.simulator_filter)
    if config.homeassistant.enabled:
        birth = DiscoveryTopics(config.homeassistant.discovery_prefix).birth
        subscriptions = (*subscriptions, birth)
    return subscriptions


def _with_uploads(
    uploads: Uploads, commands: Callable[[Inbound, Receipt], None]
) -> Callable[[Inbound, Receipt], None]:
    """Manifests and chunks to the uploads, so they never wait in a camera's command lane."""

    def receive(message: Inbound, receipt: Receipt) -> None:
        if uploads.owns(message.topic):
            uploads.receive(message, receipt)
        else:
            commands(message, receipt)

    return receive


def _policy(config: Config) -> Policy:
    """`[security]` as the command boundary and the upload manifests apply it."""
    return Policy(
        keys=config.security.trusted_keys(),
        require_signed=config.security.require_signed,
        max_command_age=config.security.max_command_age,
    )


def _transfers(
    config: Config,
    topics: Topics,
    store: ModelStore,
    reporter: Reporter,
    coordinator: Coordinator,
) -> tuple[Uploads, Transfers]:
    """Chunked uploads and downloads: their folders taken over, ready to run."""
    uploads = Uploads(
        config.state_path / "uploads",
        topics=topics,
        store=store,
        reporter=reporter,
        settings=config.models,
        max_chunk_bytes=config.agent.max_payload_bytes,
        policy=_policy(config),
    )
    uploads.models_in_use(coordinator.models_in_use, coordinator.models_kept)
    uploads.load()
    transfers = Transfers(
        config.state_path / "downloads",
        store=store,
        uploads=uploads,
        settings=config.download,
        abandon_after=config.models.upload_timeout,
    )
    transfers.clean_up()
    return uploads, transfers


def _homeassistant(
    config: Config,
    link: MqttLink,
    topics: Topics,
    backend: CameraBackend,
    broker: BrokerOptions,
    *,
    saved_cameras: Callable[[], set[str]],
) -> HomeAssistant:
    ha_topics = DiscoveryTopics(config.homeassistant.discovery_prefix)
    discovery = Discovery(
        topics=topics,
        discovery=ha_topics,
        agent_id=config.agent.id,
        version=__version__,
        labels=config.homeassistant.labels,
    )
    return HomeAssistant(
        link,
        discovery,
        ha_topics,
        cameras=lambda: backend.cameras,
        saved_cameras=saved_cameras,
        broker=broker,
        client_id=config.client_id,
    )


async def serve(
    config: Config,
    *,
    source: Path | None = None,
    group_writes: bool = True,
    broker: BrokerOptions | None = None,
    concurrent_commands: bool = True,
    task_status: TaskStatus[App] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until cancelled.

    `group_writes=False` (each command waits for its own state write) and
    `concurrent_commands=False` (one command at a time, whatever its camera) only to
    benchmark the old ways.
    """
    topics = Topics.for_agent(config.mqtt.prefix, config.agent.id, config.agent.groups)
    backend = _backend(config)
    simulator = backend if isinstance(backend, SimulatorBackend) else None
    mqtt = config.mqtt
    if config.broker.embedded and mqtt.protocol == "5":
        # amqtt speaks 3.1.1 only, and stalls on a v5 CONNECT carrying a will
        log.info("the embedded broker speaks MQTT 3.1.1; using it")
        mqtt = msgspec.structs.replace(mqtt, protocol="3.1.1")
    link = MqttLink(
        mqtt,
        client_id=config.client_id,
        will_topic=topics.availability,
        subscriptions=_subscriptions(config, topics, simulated=simulator is not None),
        event_queue_size=config.agent.event_queue_size,
        detection_queue_size=config.agent.detection_queue_size,
        max_payload_bytes=config.agent.max_payload_bytes,
        broker=broker,
    )
    homeassistant = None
    if config.homeassistant.enabled:
        homeassistant = _homeassistant(
            config,
            link,
            topics,
            backend,
            broker if broker is not None else broker_options(mqtt),
            # called only once running, when `coordinator` is there
            saved_cameras=lambda: coordinator.saved_cameras,
        )
    reporter = Reporter(link, topics, homeassistant)
    store = ModelStore(
        config.state_path / "models",
        on_write_error=lambda problem: reporter.agent_error(ModelWriteFailed(problem)),
        # models uploaded but not (yet) referenced: a few of the largest commands
        unreferenced_bytes=4 * config.agent.max_payload_bytes,
        keep_unreferenced=config.models.keep_unreferenced,
    )
    audit = AuditLog(
        config.state_path / "audit",
        on_failure=reporter.agent_error,
        max_bytes=config.security.audit_max_bytes,
        enabled=config.security.audit,
    )
    coordinator = Coordinator(
        reporter,
        topics,
        state=StateFile(config.state_path),
        store=store,
        audit=audit,
        group_writes=group_writes,
        output=config.output,
        max_signed_requests=config.security.max_signed_requests,
    )
    coordinator.load()
    for camera in backend.cameras.values():
        coordinator.add_camera(camera)
    uploads, transfers = _transfers(config, topics, store, reporter, coordinator)
    health = HealthMonitor(
        reporter,
        link.stats,
        lambda: backend.cameras,
        lambda mxid: worker.running.keys() if (worker := coordinator.workers.get(mxid)) else (),
        interval=config.agent.stats_interval,
    )
    handler = CommandHandler(
        topics=topics,
        coordinator=coordinator,
        store=store,
        reporter=reporter,
        max_payload_bytes=config.agent.max_payload_bytes,
        simulator=simulator,
        transfers=transfers,
        output=config.output,
        stats_requested=health.request,
        policy=_policy(config),
        audit=audit,
    )
    intake = Intake(handler, coordinator, lanes=concurrent_commands)
    app = App(
        config,
        topics,
        link,
        coordinator,
        backend,
        reporter,
        _hints(config, topics, backend, source),
        audit,
        uploads,
        homeassistant,
    )

    async with AsyncExitStack() as stack:
        # entered first, left last: it writes the lines of the shutdown's answers too
        await stack.enter_async_context(audit.running())
        if config.broker.embedded:
            from agent.broker import embedded_broker  # noqa: PLC0415  # amqtt only when used

            await stack.enter_async_context(embedded_broker(config.mqtt.host, config.mqtt.port))
        listener = _Listener(config, backend, coordinator, reporter, link.stats.counters)
        reporter.availability(True)
        async with anyio.create_task_group() as tg:
            await tg.start(coordinator.run, name="coordinator")
            tg.start_soon(_shaping_clock, reporter, name="reporter.clock")
            await tg.start(backend.run, listener, name="backend")
            listener.publish_info()  # real cameras are known only once the backend ran
            await tg.start(health.run, name="stats")
            if config.metrics is not None:
                from agent.metrics import MetricsServer  # noqa: PLC0415  # prometheus only when used

                await tg.start(MetricsServer(config.metrics.listen, health).run, name="metrics")
            if not backend.cameras:
                log.warning("no cameras found yet; they are adopted when they appear")
            await tg.start(intake.run, name="commands")
            await tg.start(uploads.run, name="uploads")
            if homeassistant is not None:
                await tg.start(homeassistant.run, name="homeassistant")
            await tg.start(
                partial(
                    link.run,
                    _with_uploads(uploads, _router(intake, homeassistant)),
                    answered=intake.stopped,
                    report=reporter.agent_error,
                ),
                name="mqtt",
            )
            log.info(
                "agent started",
                agent_id=config.agent.id,
                broker=f"{config.mqtt.host}:{config.mqtt.port}",
                base_topic=topics.base,
                cameras=list(backend.cameras),
                protocol=link.protocol,
            )
            task_status.started(app)
