"""`oak-agent fleet deploy|delete|status|abort --config controller.toml`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
import anyio
import msgspec

from agent.client import sha256_argument
from agent.config import ConfigError
from agent.connect import broker_options, connect_problem
from agent.fleet.config import load_controller_config
from agent.fleet.controller import Controller, FleetView, Signer, connect, read_into, sync
from agent.fleet.delivery import Uploads
from agent.fleet.plan import (
    ROLLOUT_ID_RE,
    Options,
    Rollout,
    Selection,
    Spec,
    counts,
    select_targets,
)
from agent.fleet.progress import PlainLines, progress_for, summary, table
from agent.keyfiles import key_id_of, read_signing_key
from agent.messages import NNConfig
from agent.sender import ModelFile, sha256_of
from agent.topics import STREAM_RE, FleetTopics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from agent.connect import BrokerOptions
    from agent.fleet.config import ControllerConfig

__all__ = ["EXIT_CODES", "add_fleet_commands", "run_fleet_command"]

EXIT_OK: Final = 0
EXIT_ABORTED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INCOMPLETE: Final = 3
EXIT_BROKER: Final = 4
EXIT_COMPLETED_WITH_FAILURES: Final = 5
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final = f"""\
exit codes:
  {EXIT_OK}    every camera succeeded (status/abort: the rollout was found)
  {EXIT_ABORTED}    aborted (too many failures, or `fleet abort`); changed cameras rolled back
  {EXIT_USAGE}    bad arguments or configuration; no camera matches; no such rollout
  {EXIT_INCOMPLETE}    stopped with outcomes unknown (no answer within --timeout): `--resume ID` it
  {EXIT_BROKER}    the broker is unreachable, refused the connection or dropped it
  {EXIT_COMPLETED_WITH_FAILURES}    every camera was tried; some failed, within --abort-percent
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): `--resume ID` continues it"""

_EXIT_OF_STATE: Final = {
    "succeeded": EXIT_OK,
    "completed": EXIT_COMPLETED_WITH_FAILURES,
    "aborted": EXIT_ABORTED,
    "aborting": EXIT_INCOMPLETE,
    "running": EXIT_INCOMPLETE,
    "incomplete": EXIT_INCOMPLETE,
}
_nn_config_decoder: Final = msgspec.json.Decoder(NNConfig)
# an upload's connection that a broker drops is reported in its cameras' errors, not by paho
_UPLOAD_LOG: Final = logging.getLogger("agent.fleet.upload")
_UPLOAD_LOG.setLevel(logging.CRITICAL)


class FleetExit(Exception):
    """An expected end: one line for stderr and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- arguments ----------------------------------------------------------------------------


def _rollout_id(value: str) -> str:
    if not ROLLOUT_ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: 1-60 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    return value


def _stream(value: str) -> str:
    if not STREAM_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: CAM_A..CAM_H or DEPTH_X_Y")
    return value


def _nn_config(value: str) -> NNConfig:
    try:
        config: NNConfig = _nn_config_decoder.decode(value)
    except msgspec.ValidationError as exc:
        raise argparse.ArgumentTypeError(f"not a valid NNConfig: {exc}") from None
    except msgspec.DecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    return config


def _number(kind: type[int] | type[float], low: float, high: float | None = None) -> Any:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if number < low or (high is not None and number > high):
            bound = f"{low:g}..{high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{value}: must be {bound}")
        return number

    return parse


def _rollout_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="controller.toml")
    pick = parser.add_argument_group("which cameras (each kind narrows; repeat to widen)")
    pick.add_argument("--group", action="append", default=[], help="agents in this group")
    pick.add_argument("--agent", action="append", default=[], help="this agent id")
    pick.add_argument("--camera", action="append", default=[], help="camera name or mxid")
    parser.add_argument("--stream", type=_stream, help="CAM_A..CAM_H or DEPTH_X_Y")
    waves = parser.add_argument_group("waves and abort")
    waves.add_argument(
        "--max-parallel", type=_number(int, 1), default=5, metavar="N", help="cameras per wave (5)"
    )
    waves.add_argument(
        "--batch-percent",
        type=_number(float, 0.001, 100),
        default=100.0,
        metavar="P",
        help="at most P %% of the cameras per wave (100)",
    )
    waves.add_argument(
        "--abort-percent",
        type=_number(float, 0, 100),
        default=20.0,
        metavar="P",
        help="abort and roll back once more than P %% of the executed cameras failed (20)",
    )
    waves.add_argument(
        "--min-executed",
        type=_number(int, 1),
        default=1,
        metavar="N",
        help="judge --abort-percent only after N cameras ended (1)",
    )
    waves.add_argument(
        "--timeout",
        type=_number(float, 0.1),
        default=120.0,
        metavar="SECONDS",
        help="wait this long for each camera's final answer (120); then its outcome is unknown",
    )
    _signing_options(parser)
    parser.add_argument("--rollout-id", type=_rollout_id, help="(default: generated)")
    parser.add_argument("--resume", type=_rollout_id, metavar="ID", help="continue rollout ID")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report here")


def _signing_options(parser: argparse.ArgumentParser) -> None:
    signing = parser.add_argument_group("signed commands ([security] in the agents' configs)")
    signing.add_argument(
        "--sign-key",
        type=Path,
        metavar="PEM",
        help="sign every command with this Ed25519 private key (from `oak-agent keygen`)",
    )
    signing.add_argument("--key-id", help="the key's id (default: the key file's name)")
    signing.add_argument(
        "--expires-in",
        type=_number(float, 1),
        default=60.0,
        metavar="SECONDS",
        help="a signed command's expires_at, from when it is sent (60)",
    )


def _signer(args: argparse.Namespace, protocol: str) -> Signer | None:
    if getattr(args, "sign_key", None) is None:
        if getattr(args, "key_id", None) is not None:
            raise FleetExit(EXIT_USAGE, "--key-id goes with --sign-key")
        return None
    try:
        key = read_signing_key(args.sign_key)
        key_id = args.key_id or key_id_of(args.sign_key)
    except OSError as exc:
        raise FleetExit(EXIT_USAGE, f"cannot read {args.sign_key}: {exc.strerror}") from None
    except ValueError as exc:
        raise FleetExit(EXIT_USAGE, str(exc)) from None
    return Signer(key, key_id, expires_in=args.expires_in, mqtt5=protocol == "5")


def add_fleet_commands(sub: Any) -> None:
    """Add `fleet` with deploy, delete, status and abort to the `oak-agent` subcommands."""
    fleet = sub.add_parser(
        "fleet",
        help="roll a model out to many cameras in waves, with abort and rollback",
        description=(
            "Roll a model out to the cameras of many agents in waves; abort and roll back "
            "the changed cameras when too many fail. The rollout's record is kept retained "
            "on {prefix}/rollouts/{id}."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = fleet.add_subparsers(
        dest="fleet_command", required=True, metavar="ACTION", help="one of these:"
    )
    deploy = actions.add_parser(
        "deploy", help="deploy a model", epilog=EXIT_CODES, formatter_class=_raw()
    )
    _rollout_options(deploy)
    source = deploy.add_argument_group("the model: --model, --model-url, or --model-sha256 alone")
    source.add_argument(
        "--model",
        type=Path,
        metavar="BLOB",
        help="a MyriadX .blob file, uploaded in chunks to each agent that does not store it",
    )
    source.add_argument(
        "--model-url",
        metavar="URL",
        help="an http(s) URL each agent downloads the model from (with --model-sha256)",
    )
    source.add_argument(
        "--model-sha256",
        type=sha256_argument,
        metavar="SHA256",
        help="the model's sha256: alone, a model every agent stores already",
    )
    source.add_argument(
        "--model-size", type=_number(int, 1), metavar="BYTES", help="with --model-url: its size"
    )
    deploy.add_argument(
        "--max-packet",
        type=_number(int, 4096),
        metavar="BYTES",
        help="the smallest packet limit between here and the agents (a capped site broker "
        "behind the central one): upload chunks fit it (default: the broker's own limit)",
    )
    deploy.add_argument(
        "--nn-config",
        type=_nn_config,
        default=None,
        metavar="JSON",
        help='NNConfig as JSON, e.g. \'{"type": "MobileNet"}\' (default Generic)',
    )
    deploy.add_argument("--labels", help="comma-separated class names")
    deploy.add_argument("--model-name", help="a name for dashboards (default: the file's name)")
    delete = actions.add_parser(
        "delete", help="remove the model from a stream", epilog=EXIT_CODES, formatter_class=_raw()
    )
    _rollout_options(delete)
    for name, what in (("status", "show a rollout's record"), ("abort", "abort a rollout")):
        parser = actions.add_parser(name, help=what, epilog=EXIT_CODES, formatter_class=_raw())
        parser.add_argument("id", type=_rollout_id, metavar="ID", help="the rollout id")
        parser.add_argument("--config", type=Path, required=True, help="controller.toml")
        if name == "status":
            parser.add_argument("--json", action="store_true", help="print the record as JSON")
        else:
            parser.add_argument(
                "--timeout",
                type=_number(float, 0.1),
                default=120.0,
                metavar="SECONDS",
                help="for each rollback's final answer (120)",
            )
            parser.add_argument("--report", type=Path, metavar="FILE", help="JSON report")
            _signing_options(parser)


def _raw() -> type[argparse.RawDescriptionHelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


# --- running ------------------------------------------------------------------------------


def run_fleet_command(args: argparse.Namespace) -> int:
    try:
        config = load_controller_config(args.config)
        broker = broker_options(config.mqtt)
    except ConfigError as exc:
        print(f"oak-agent fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        match args.fleet_command:
            case "status":
                work: Callable[[], Awaitable[int]] = lambda: _status(config, broker, args)  # noqa: E731
            case "abort":
                signer = _signer(args, config.mqtt.protocol)
                work = lambda: _abort(config, broker, args, signer)  # noqa: E731
            case _:
                plan = _plan(args)
                signer = _signer(args, config.mqtt.protocol)
                work = lambda: _rollout(config, broker, args, plan, signer)  # noqa: E731
        outcome = anyio.run(_until_signalled, work)
    except FleetExit as exc:
        print(f"oak-agent fleet {args.fleet_command}: {exc.message}", file=sys.stderr)
        return exc.code
    if outcome is None:
        rollout_id = getattr(args, "resume", None) or getattr(args, "id", None) or "ID"
        print(
            f"oak-agent fleet: interrupted; `--resume {rollout_id}` continues it", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    return outcome


async def _until_signalled(work: Callable[[], Awaitable[int]]) -> int | None:
    outcome: int | None = None
    failure: FleetExit | None = None

    async def _work() -> None:
        nonlocal outcome, failure
        try:
            outcome = await work()
        except FleetExit as exc:
            failure = exc
        except BaseExceptionGroup as group:  # from inside the session's task group
            failure = _expected(group)
            if failure is None:
                raise
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            tg.start_soon(_work)
            async for _ in signals:
                tg.cancel_scope.cancel()
                break
    if failure is not None:
        raise failure
    return outcome


def _expected(group: BaseExceptionGroup[BaseException]) -> FleetExit | None:
    """The expected end inside an exception group: a FleetExit, or a lost connection."""
    exits, _ = group.split(FleetExit)
    if exits is not None:
        first = exits.exceptions[0]
        return first if isinstance(first, FleetExit) else _expected(first)
    lost, _ = group.split(aiomqtt.MqttError)
    if lost is not None:
        return FleetExit(EXIT_BROKER, f"lost the connection to the broker: {lost.exceptions[0]}")
    return None


class _Plan(msgspec.Struct, frozen=True):
    """What the command line asks for: a new rollout (spec) or a resumed one."""

    rollout_id: str
    resume: bool
    spec: Spec | None = None
    selection: Selection = Selection()
    options: Options = Options()
    model: ModelFile | None = None  # uploaded to the agents that lack it


def _plan(args: argparse.Namespace) -> _Plan:
    options = Options(
        max_parallel=args.max_parallel,
        batch_percent=args.batch_percent,
        abort_percent=args.abort_percent,
        min_executed=args.min_executed,
        timeout=args.timeout,
    )
    model = _model_file(args)
    if args.resume:
        return _Plan(rollout_id=args.resume, resume=True, options=options, model=model)
    if args.stream is None:
        raise FleetExit(EXIT_USAGE, "--stream is required (or --resume ID)")
    spec = Spec(action=args.fleet_command, stream=args.stream)
    if args.fleet_command == "deploy":
        if model is None and args.model_sha256 is None:
            raise FleetExit(EXIT_USAGE, "--model, --model-url or --model-sha256 is required")
        spec = Spec(
            action="deploy",
            stream=args.stream,
            nn_config=args.nn_config or _nn_config('{"type": "Generic"}'),
            model_sha256=model.sha256 if model else args.model_sha256,
            model_name=args.model_name or (model.path.name if model else None),
            labels=tuple(args.labels.split(",")) if args.labels else None,
            model_url=args.model_url,
            model_size=args.model_size,
        )
    selection = Selection(
        groups=tuple(args.group), agents=tuple(args.agent), cameras=tuple(args.camera)
    )
    rollout_id = args.rollout_id or f"r-{uuid.uuid4().hex[:12]}"
    return _Plan(rollout_id, False, spec, selection, options, model)


def _model_file(args: argparse.Namespace) -> ModelFile | None:
    """--model, hashed; the model options checked against each other."""
    path: Path | None = getattr(args, "model", None)
    url: str | None = getattr(args, "model_url", None)
    if path is not None and (url is not None or getattr(args, "model_sha256", None)):
        raise FleetExit(EXIT_USAGE, "--model goes alone: not with --model-url or --model-sha256")
    if url is not None and (args.resume or args.model_sha256 is None):
        raise FleetExit(
            EXIT_USAGE,
            "--model-url needs --model-sha256 (the agents check it)"
            if not args.resume
            else "--model-url is kept in the rollout's record: not with --resume",
        )
    if getattr(args, "model_size", None) is not None and url is None:
        raise FleetExit(EXIT_USAGE, "--model-size goes with --model-url")
    if path is None:
        return None
    try:
        return sha256_of(path)
    except OSError as exc:
        raise FleetExit(EXIT_USAGE, f"cannot read {path}: {exc.strerror}") from None


@contextlib.asynccontextmanager
async def _session(
    config: ControllerConfig, broker: BrokerOptions, rollout_id: str, *, controller: bool
) -> AsyncIterator[tuple[aiomqtt.Client, FleetView]]:
    """A connected client feeding a FleetView; as the rollout's controller, with its will."""
    topics = FleetTopics(config.mqtt.prefix)
    will = None
    if controller:
        will = aiomqtt.Will(topics.rollout_controller(rollout_id), b"offline", qos=1, retain=True)
    client = connect(
        broker,
        protocol=config.mqtt.protocol,
        client_id=f"oak-fleet-{uuid.uuid4().hex[:12]}",
        will=will,
    )
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        problem = connect_problem(exc, broker)
        what = problem.message if problem else f"cannot connect to {broker.where}: {exc}"
        raise FleetExit(EXIT_BROKER, what) from None
    view = FleetView(topics)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_into, client, view)
            for topic in (
                topics.rollout(rollout_id),
                topics.rollout_controller(rollout_id),
                topics.rollout_abort(rollout_id),
                topics.rollout_sync(rollout_id),
            ):
                await client.subscribe(topic, qos=1)
            yield client, view
            tg.cancel_scope.cancel()
    except aiomqtt.MqttError as exc:
        raise FleetExit(
            EXIT_BROKER, f"lost the connection to {broker.where}: {exc}; `--resume {rollout_id}`"
        ) from None
    finally:
        with anyio.move_on_after(2, shield=True), contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


async def _discover(client: aiomqtt.Client, view: FleetView, rollout_id: str, stream: str) -> None:
    topics = view.topics
    for topic in (
        topics.info_filter,
        topics.availability_filter,
        topics.events_filter,
        topics.models_filter,
        topics.nn_status_filter(stream),
    ):
        await client.subscribe(topic, qos=1)
    await sync(client, view, rollout_id)


async def _rollout(
    config: ControllerConfig,
    broker: BrokerOptions,
    args: argparse.Namespace,
    plan: _Plan,
    signer: Signer | None,
) -> int:
    async with _session(config, broker, plan.rollout_id, controller=True) as (client, view):
        await sync(client, view, plan.rollout_id)
        known = view.records.get(plan.rollout_id)
        if plan.resume:
            if known is None:
                raise FleetExit(EXIT_USAGE, f"no rollout {plan.rollout_id} on {broker.where}")
            rollout = _resumable(known, view, plan)
            if rollout.finished:
                print(summary(rollout))
                return _finish(rollout, args)
        else:
            if known is not None:
                raise FleetExit(EXIT_USAGE, f"rollout {plan.rollout_id} exists: --resume it")
            if plan.spec is None:  # never: a new rollout has one
                raise FleetExit(EXIT_USAGE, "nothing to roll out")
            now = time.time()
            rollout = Rollout(
                id=plan.rollout_id,
                spec=plan.spec,
                selection=plan.selection,
                options=plan.options,
                created_at=now,
                updated_at=now,
            )
        await _discover(client, view, plan.rollout_id, rollout.spec.stream)
        if not plan.resume:
            rollout.targets = select_targets(
                view.infos, view.online, rollout.selection, rollout.spec.stream
            )
            if not rollout.targets:
                raise FleetExit(
                    EXIT_USAGE,
                    f"no online camera with {rollout.spec.stream} matches the selection "
                    f"({len(view.online)} agents online)",
                )
        uploads = _uploads(
            config, broker, args, rollout, model=plan.model, signer=signer, view=view
        )
        return await _drive(client, view, rollout, args, uploads=uploads, signer=signer)


def _uploads(
    config: ControllerConfig,
    broker: BrokerOptions,
    args: argparse.Namespace,
    rollout: Rollout,
    *,
    model: ModelFile | None,
    signer: Signer | None,
    view: FleetView,
) -> Uploads | None:
    """How the model reaches the agents that lack it; FleetExit when it cannot."""
    spec = rollout.spec
    if spec.action != "deploy" or spec.model_url is not None or spec.model_sha256 is None:
        return None  # nothing to send, or each agent downloads it
    if model is None:
        waiting = {t.agent for t in rollout.targets if t.state in {"pending", "uploading"}}
        lacking = sorted(a for a in waiting if not view.stores(a, spec.model_sha256))
        if lacking:
            raise FleetExit(
                EXIT_USAGE,
                f"agent(s) {', '.join(lacking)} do not store model {spec.model_sha256}: "
                "give --model FILE to upload it (or --model-url to have them download it)",
            )
        return None
    protocol = config.mqtt.protocol

    def open_client() -> aiomqtt.Client:
        client_id = f"oak-fleet-up-{uuid.uuid4().hex[:12]}"
        return connect(broker, protocol=protocol, client_id=client_id, logger=_UPLOAD_LOG)

    return Uploads(
        model=model,
        open_client=open_client,
        mqtt5=protocol == "5",
        max_packet=getattr(args, "max_packet", None),
        timeout=rollout.options.timeout,
        signer=signer,
        model_name=spec.model_name,
    )


def _resumable(known: Rollout, view: FleetView, plan: _Plan) -> Rollout:
    if view.controllers.get(known.id) == "online":
        raise FleetExit(EXIT_USAGE, f"a controller is running rollout {known.id}")
    spec = known.spec
    if spec.action == "deploy" and plan.model is not None:
        sha256 = plan.model.sha256
        if sha256 != spec.model_sha256:
            raise FleetExit(
                EXIT_USAGE, f"--model has sha256 {sha256}, the rollout deploys {spec.model_sha256}"
            )
    if known.state in {"running", "incomplete"}:
        for target in known.targets:
            if target.state in {"uploading", "sent", "unknown"}:  # again, under the same id
                target.state = "pending"
        known.state, known.reason = "running", None
    return known


async def _drive(
    client: aiomqtt.Client,
    view: FleetView,
    rollout: Rollout,
    args: argparse.Namespace,
    *,
    uploads: Uploads | None = None,
    signer: Signer | None,
) -> int:
    progress = progress_for()
    try:
        controller = Controller(
            client, view, rollout, progress=progress, uploads=uploads, signer=signer
        )
        try:
            done = await controller.run()
        finally:
            with anyio.move_on_after(2, shield=True), contextlib.suppress(aiomqtt.MqttError):
                topic = view.topics.rollout_controller(rollout.id)
                await client.publish(topic, b"offline", qos=1, retain=True)
    finally:
        progress.close()
    if not isinstance(progress, PlainLines):  # plain lines printed it already
        print(summary(done))
    return _finish(done, args)


def _finish(rollout: Rollout, args: argparse.Namespace) -> int:
    code = _EXIT_OF_STATE.get(rollout.state, EXIT_INCOMPLETE)
    report: Path | None = getattr(args, "report", None)
    if report is not None:
        document = {
            "rollout": msgspec.to_builtins(rollout),
            "counts": counts(rollout.targets),
            "exit_code": code,
        }
        report.write_text(json.dumps(document, indent=2) + "\n")
    return code


async def _status(config: ControllerConfig, broker: BrokerOptions, args: argparse.Namespace) -> int:
    async with _session(config, broker, args.id, controller=False) as (client, view):
        await sync(client, view, args.id)
        rollout = view.records.get(args.id)
        running = view.controllers.get(args.id) == "online"
    if rollout is None:
        raise FleetExit(EXIT_USAGE, f"no rollout {args.id} on {broker.where}")
    if args.json:
        print(json.dumps(msgspec.to_builtins(rollout), indent=2))
    elif sys.stdout.isatty():
        from rich.console import Console  # noqa: PLC0415

        Console().print(table(rollout))
    else:
        lines = PlainLines(sys.stdout)
        lines.update(rollout)
    print(f"controller: {'running' if running else 'not running'}", file=sys.stderr)
    return EXIT_OK


async def _abort(
    config: ControllerConfig, broker: BrokerOptions, args: argparse.Namespace, signer: Signer | None
) -> int:
    async with _session(config, broker, args.id, controller=False) as (client, view):
        await sync(client, view, args.id)
        rollout = view.records.get(args.id)
        if rollout is None:
            raise FleetExit(EXIT_USAGE, f"no rollout {args.id} on {broker.where}")
        if rollout.finished:
            print(summary(rollout))
            return _finish(rollout, args)
        if view.controllers.get(args.id) == "online":
            # its controller aborts after the wave under way, then rolls back
            await client.publish(view.topics.rollout_abort(args.id), b"abort", qos=1)
            try:
                with anyio.fail_after(args.timeout * 2 + rollout.options.timeout):
                    while (rollout := view.records[args.id]).state in {"running", "aborting"}:
                        await view.record_changed().wait()
            except TimeoutError:
                raise FleetExit(
                    EXIT_INCOMPLETE, f"rollout {args.id} is still {rollout.state}"
                ) from None
            print(summary(rollout))
            return _finish(rollout, args)
    # nobody runs it: roll back here
    async with _session(config, broker, args.id, controller=True) as (client, view):
        await sync(client, view, args.id)
        rollout = view.records[args.id]
        if view.controllers.get(args.id) == "online":
            raise FleetExit(EXIT_USAGE, f"a controller took rollout {args.id} over meanwhile")
        rollout.state, rollout.reason = "aborting", "aborted by `fleet abort`"
        rollout.options = msgspec.structs.replace(rollout.options, timeout=args.timeout)
        await _discover(client, view, args.id, rollout.spec.stream)
        return await _drive(client, view, rollout, args, signer=signer)
