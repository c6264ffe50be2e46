"""A small MQTT client for trying the agent: deploy, delete, watch.

It reaches the agent with `--host/--port/--prefix/--agent`, or reads them from the agent's
own TOML (`--config`; flags override it). It talks MQTT 3.1.1, so it works with the embedded
demo broker too. It acts only on messages on the topics it subscribed to (amqtt also sends a
new client the retained messages other clients subscribed to), skips what does not decode,
and reports an expected failure as one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiomqtt
import anyio
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import overview
from agent.config import ConfigError, MqttSection, load_config
from agent.connect import BrokerOptions, broker_options, connect_problem
from agent.keyfiles import config_snippet, key_id_of, read_signing_key, write_key_pair
from agent.messages import Event
from agent.mqtt import payload_bytes
from agent.render import Style, render
from agent.retained import collect_retained
from agent.signing import KEY_ID_PROPERTY, KEY_ID_RE, SIGNATURE_PROPERTY, envelope, sign
from agent.topics import Topics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "EXIT_BROKER",
    "EXIT_CODES_HELP",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "add_client_commands",
    "decode_event",
    "run_client_command",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_BROKER = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    done: the request succeeded; watch ended (Ctrl-C, --count, --timeout)
  {EXIT_FAILED}    the request was rejected, failed or superseded (its event is printed)
  {EXIT_USAGE}    bad arguments or configuration
  {EXIT_TIMEOUT}    no final answer within --timeout (watch: fewer than --count messages)
  {EXIT_BROKER}    the broker is unreachable, refused the connection or dropped it
  {EXIT_INTERRUPTED}  deploy/delete interrupted by Ctrl-C (the agent may still carry it out)"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
DEFAULT_PREFIX = "oak"
DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_STATUS_TIMEOUT = 5.0
_STATUS_QUIET = 0.5  # status: the retained messages are in once none came for this long
DEFAULT_EXPIRES_IN = 60.0  # a signed command's expires_at, from now
_CONNECT_TIMEOUT = 10.0
_LEVEL = re.compile(r"[A-Za-z0-9._-]{1,64}")
_REFUSED_PROTOCOL = frozenset({1, 132})  # 3.1.1 and MQTT 5 "unsupported protocol version"
# CONNACK return codes of MQTT 3.1.1
_REFUSALS = {
    1: "unsupported protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorised",
}

_event_decoder = msgspec.json.Decoder(Event)


class ClientExit(Exception):
    """An expected end: one line for stderr and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Signer:
    key: Ed25519PrivateKey
    key_id: str


@dataclass(frozen=True, slots=True)
class _Target:
    broker: BrokerOptions
    topics: Topics
    agent: str
    # MQTT 5 for signed commands (user properties) unless the agent's broker speaks 3.1.1
    mqtt5: bool = True
    # the agent's [security] max_command_age, when its config is given
    max_command_age: float | None = None

    @property
    def where(self) -> str:
        return self.broker.where


# --- arguments ----------------------------------------------------------------------------


def _level(value: str) -> str:
    if not _LEVEL.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a topic level ([A-Za-z0-9._-]+)")
    return value


def _segment(value: str) -> str:
    if not value or any(c in value for c in "/+#"):
        raise argparse.ArgumentTypeError(f"{value!r}: must be non-empty, without / + #")
    return value


def _json_object(value: str) -> dict[str, Any]:
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"type": "Generic"}\'')
    return decoded


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return seconds


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (1-65535)")
    return int(value)


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a count (0, 1, 2, ...)")
    return int(value)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the agent is (flags override --config)")
    where.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="the agent's TOML: host, port, prefix, agent id, login",
    )
    where.add_argument("--host", help=f"MQTT broker host (default {DEFAULT_HOST})")
    where.add_argument("--port", type=_port, help=f"MQTT broker port (default {DEFAULT_PORT})")
    where.add_argument(
        "--prefix", type=_level, help=f"topic prefix of the agent (default {DEFAULT_PREFIX})"
    )
    where.add_argument("--agent", type=_level, help="the agent's id (required without --config)")
    where.add_argument("--username", help="MQTT username")
    where.add_argument(
        "--password-file",
        type=Path,
        metavar="PATH",
        help="a file whose first line is the MQTT password",
    )
    return common


def _key_id(value: str) -> str:
    if not KEY_ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a key id ([A-Za-z0-9._-], 1-64)")
    return value


def _default_key_id() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "operator"


def _request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--camera",
        required=True,
        type=_segment,
        metavar="MXID",
        help="the camera's mxid, e.g. 14442C10D13EABCE00",
    )
    parser.add_argument(
        "--stream", required=True, type=_segment, help="CAM_A..CAM_H, or DEPTH_X_Y (stereo pair)"
    )
    parser.add_argument(
        "--request-id", help="echoed in every event; a repeated id is answered, not re-run"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the final answer (default %(default)g)",
    )
    signing = parser.add_argument_group("signed commands ([security] in the agent's config)")
    signing.add_argument(
        "--sign-key",
        type=Path,
        metavar="FILE",
        help="sign the command with this Ed25519 private key (PEM, from `oak-agent keygen`)",
    )
    signing.add_argument(
        "--key-id",
        type=_key_id,
        help="the key's id in the agent's [[security.keys]] (default: the key file's name "
        "without .key)",
    )
    signing.add_argument(
        "--expires-in",
        type=_seconds,
        metavar="SECONDS",
        help=f"the command's expires_at, from now (default when signed: {DEFAULT_EXPIRES_IN:g}, "
        "or the agent's max_command_age from --config when smaller)",
    )


def add_client_commands(sub: Any) -> None:
    """Add `deploy`, `delete`, `watch` and `status` to the `oak-agent` subcommands."""
    common = _common_options()
    deploy = sub.add_parser(
        "deploy",
        parents=[common],
        help="deploy a model onto a camera stream and follow it to the end",
        description="Send a deploy command and print the request's events until it ends.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _request_options(deploy)
    source = deploy.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", type=Path, metavar="BLOB", help="a MyriadX .blob file, sent with the command"
    )
    source.add_argument(
        "--model-sha256", metavar="SHA256", help="the sha256 of a model the agent already stores"
    )
    deploy.add_argument(
        "--nn-config",
        type=_json_object,
        default={"type": "Generic"},
        metavar="JSON",
        help='NNConfig as JSON (default \'{"type": "Generic"}\'), e.g. \'{"type": "MobileNet"}\'',
    )
    deploy.add_argument("--labels", help="comma-separated class names, e.g. person,car")
    deploy.add_argument("--model-name", help="a name for dashboards (default: the file's name)")
    deploy.add_argument(
        "--output",
        type=_json_object,
        metavar="JSON",
        help='output shaping, e.g. \'{"max_rate": 2, "min_confidence": 0.6}\' (default: the '
        "agent's [output])",
    )
    deploy.set_defaults(parser=deploy)

    delete = sub.add_parser(
        "delete",
        parents=[common],
        help="remove the model from a camera stream",
        description="Send a delete command and print the request's events until it ends.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _request_options(delete)
    delete.set_defaults(parser=delete)

    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="print what is published under the agent's topics",
        description=(
            "Print every message under {prefix}/{agent}/, each once: JSON pretty on a terminal "
            "and compact (one line each) otherwise, text as is, binary payloads (MessagePack "
            "commands with a model) as a one-line summary. Runs until Ctrl-C."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument(
        "--count", type=_count, default=0, metavar="N", help="stop after N messages (0: never)"
    )
    watch.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="stop after this many seconds"
    )
    watch.add_argument(
        "--raw", action="store_true", help="print text payloads as received, not reformatted"
    )
    watch.add_argument(
        "--no-retained", action="store_true", help="skip the retained state; only what is new"
    )
    watch.set_defaults(parser=watch)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="one table of every agent, camera and stream on the broker",
        description=(
            "Read the retained topics under the prefix and print one table: agents, cameras, "
            "streams, NN state, model, objects and what is present, temperature, last error. "
            "Every agent under the prefix unless --agent names one (--config gives the "
            "broker and prefix, not the agent)."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_STATUS_TIMEOUT,
        metavar="SECONDS",
        help="read retained messages for at most this long (default %(default)g)",
    )
    status.add_argument(
        "--format",
        choices=["auto", "table", "plain", "json"],
        default="auto",
        help="auto: a table on a terminal, plain columns otherwise (default %(default)s)",
    )
    status.set_defaults(parser=status)
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing commands",
        description=(
            "Write a new Ed25519 key pair for signing commands: DIR/ID.key (the private key, "
            "PEM, mode 0600; give it to `deploy|delete --sign-key`) and DIR/ID.pub (the public "
            "key in base64), and print the lines that make an agent trust it."
        ),
    )
    keygen.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for the two files"
    )
    keygen.add_argument(
        "--key-id",
        type=_key_id,
        default=None,
        help="the key's id (default: this host's name)",
    )
    keygen.set_defaults(parser=keygen)


# --- running ------------------------------------------------------------------------------


def run_client_command(args: argparse.Namespace) -> int:
    """Run `deploy`, `delete`, `watch`, `status` or `keygen`; the exit code."""
    parser: argparse.ArgumentParser = args.parser
    if args.command == "keygen":
        return _keygen(args)
    try:
        target = _target(args)
        signer = None if args.command in ("watch", "status") else _signer(args)
    except ClientExit as exc:
        parser.error(exc.message)  # usage and exit 2
    try:
        if args.command == "status":
            outcome = anyio.run(_until_signalled, lambda: _status(target, args))
            return EXIT_INTERRUPTED if outcome is None else outcome
        if args.command == "watch":
            outcome = anyio.run(_until_signalled, lambda: _watch(target, args))
            return EXIT_OK if outcome is None else outcome
        body = _body(args, signed=signer is not None, max_age=target.max_command_age)
        outcome = anyio.run(_until_signalled, lambda: _request(target, args, body, signer))
    except ClientExit as exc:
        print(f"oak-agent {args.command}: {exc.message}", file=sys.stderr)
        return exc.code
    if outcome is None:
        print(
            f"oak-agent {args.command}: interrupted; the agent may still carry out "
            f"request {body['request_id']}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return outcome


def _keygen(args: argparse.Namespace) -> int:
    key_id = args.key_id or _default_key_id()
    try:
        pair = write_key_pair(args.out, key_id)
    except (ValueError, OSError) as exc:
        print(f"oak-agent keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"# private key: {pair.private} (keep it secret; "
        f"oak-agent deploy|delete --sign-key {pair.private})\n"
        f"# public key:  {pair.public}\n"
        "# add to the agent's config:\n" + config_snippet(pair),
        end="",
    )
    return EXIT_OK


def _signer(args: argparse.Namespace) -> _Signer | None:
    if args.sign_key is None:
        if args.key_id is not None:
            raise ClientExit(EXIT_USAGE, "--key-id goes with --sign-key")
        return None
    try:
        key = read_signing_key(args.sign_key)
        key_id = args.key_id or key_id_of(args.sign_key)
    except OSError as exc:
        raise ClientExit(EXIT_USAGE, f"cannot read {args.sign_key}: {exc.strerror}") from None
    except ValueError as exc:
        raise ClientExit(EXIT_USAGE, str(exc)) from None
    return _Signer(key, key_id)


def _target(args: argparse.Namespace) -> _Target:
    config = None
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise ClientExit(EXIT_USAGE, str(exc)) from None
    agent = args.agent or (config.agent.id if config else None)
    if args.command == "status":  # every agent under the prefix unless --agent names one
        agent = args.agent or "+"
    if agent is None:
        raise ClientExit(EXIT_USAGE, "--agent is required without --config")
    prefix = args.prefix or (config.mqtt.prefix if config else DEFAULT_PREFIX)
    # the agent's own connection settings (TLS, credentials, transport), flags on top
    mqtt = config.mqtt if config else MqttSection(host=DEFAULT_HOST, port=DEFAULT_PORT)
    mqtt = msgspec.structs.replace(
        mqtt,
        host=args.host or mqtt.host,
        port=args.port or mqtt.port,
        username=args.username or mqtt.username,
    )
    if args.password_file is not None:
        mqtt = msgspec.structs.replace(mqtt, password=None, password_file=str(args.password_file))
    try:
        broker = broker_options(mqtt)
    except ConfigError as exc:
        raise ClientExit(EXIT_USAGE, str(exc)) from None
    mqtt5 = mqtt.protocol == "5" and not (config is not None and config.broker.embedded)
    return _Target(
        broker=broker,
        topics=Topics.for_agent(prefix, agent),
        agent=agent,
        mqtt5=mqtt5,
        max_command_age=config.security.max_command_age if config else None,
    )


def _body(
    args: argparse.Namespace, *, signed: bool = False, max_age: float | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": args.request_id or f"cli-{uuid.uuid4().hex[:12]}"}
    expires_in = args.expires_in
    if expires_in is None and signed:  # within the agent's max_command_age when it is known
        expires_in = min(DEFAULT_EXPIRES_IN, max_age or DEFAULT_EXPIRES_IN)
    if expires_in is not None:
        body["expires_at"] = round(time.time() + expires_in, 3)
    if args.command == "deploy":
        body["nn_config"] = args.nn_config
        if args.model is not None:
            try:
                body["model"] = args.model.read_bytes()
            except OSError as exc:
                raise ClientExit(EXIT_USAGE, f"cannot read {args.model}: {exc.strerror}") from None
            body["model_name"] = args.model_name or args.model.name
        else:
            body["model_sha256"] = args.model_sha256
            if args.model_name:
                body["model_name"] = args.model_name
        if args.labels:
            body["labels"] = args.labels.split(",")
        if args.output is not None:
            body["output"] = args.output
    return body


async def _until_signalled(work: Callable[[], Awaitable[int]]) -> int | None:
    """Run `work`; None when SIGINT or SIGTERM stopped it first."""
    outcome: int | None = None
    failure: ClientExit | None = None

    async def _work() -> None:
        nonlocal outcome, failure
        try:
            outcome = await work()
        except ClientExit as exc:
            failure = exc
        except BrokenPipeError:  # `oak-agent watch | head`: the reader is done, so are we
            _quiet_stdout()
            outcome = EXIT_OK
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


def _quiet_stdout() -> None:
    """Send what is left for stdout to /dev/null, so closing it cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _ProtocolRefused(Exception):
    """The broker does not speak MQTT 5."""


def _protocol_refused(exc: aiomqtt.MqttError) -> bool:
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    rc = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
    return rc in _REFUSED_PROTOCOL


@contextlib.asynccontextmanager
async def _connected(target: _Target, *, mqtt5: bool = False) -> AsyncIterator[aiomqtt.Client]:
    """A connected client; broker problems become a `ClientExit` naming host:port.

    `mqtt5`: connect with MQTT 5, and raise `_ProtocolRefused` when the broker refuses it.
    """
    client = aiomqtt.Client(
        **target.broker.client_kwargs(),
        identifier=f"oak-agent-cli-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311,
        timeout=_CONNECT_TIMEOUT,
    )
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        if mqtt5 and _protocol_refused(exc):
            raise _ProtocolRefused from None
        problem = connect_problem(exc, target.broker)
        if problem is None:
            _refused(exc, target)
        raise ClientExit(EXIT_BROKER, problem.message) from None
    try:
        yield client
    except aiomqtt.MqttError as exc:
        raise ClientExit(EXIT_BROKER, f"lost the connection to {target.where}: {exc}") from None
    finally:
        with anyio.move_on_after(2, shield=True):
            with contextlib.suppress(aiomqtt.MqttError):  # already gone: nothing to close
                await client.__aexit__(None, None, None)


def _refused(exc: aiomqtt.MqttError, target: _Target) -> NoReturn:
    """Raise the ClientExit for a connect that failed for a reason other than TLS or login."""
    if isinstance(exc, aiomqtt.MqttCodeError):  # a CONNACK refusal
        reason = _REFUSALS.get(exc.rc, f"code {exc.rc}") if isinstance(exc.rc, int) else exc.rc
        raise ClientExit(
            EXIT_BROKER, f"the broker at {target.where} refused the connection: {reason}"
        ) from None
    if str(exc) == "Operation timed out":  # aiomqtt's wording for a missing CONNACK
        what = f"no answer within {_CONNECT_TIMEOUT:g} s"
    else:
        what = str(exc)
    raise ClientExit(
        EXIT_BROKER, f"cannot connect to the MQTT broker at {target.where}: {what}"
    ) from None


async def _request(
    target: _Target, args: argparse.Namespace, body: dict[str, Any], signer: _Signer | None
) -> int:
    """Publish one command, print its events; the exit code of its final state."""
    seen: list[str] = []
    try:
        with anyio.fail_after(args.timeout):
            if signer is not None and target.mqtt5:
                try:
                    return await _exchange(target, args, body, signer, seen, mqtt5=True)
                except _ProtocolRefused:
                    pass  # a 3.1.1 broker: the signature goes in an envelope instead
            return await _exchange(target, args, body, signer, seen, mqtt5=False)
    except TimeoutError:
        waited = f"within {args.timeout:g} s"
        request_id = body["request_id"]
        if seen:
            raise ClientExit(
                EXIT_TIMEOUT, f"request {request_id} is still {seen[-1]}: no final answer {waited}"
            ) from None
        raise ClientExit(
            EXIT_TIMEOUT,
            f"no answer from agent {target.agent!r} on {target.where} {waited} "
            f"(is it running? `oak-agent watch` shows what it publishes)",
        ) from None


def _signed(
    topic: str, payload: bytes, signer: _Signer, *, mqtt5: bool
) -> tuple[bytes, Properties | None]:
    """The payload and properties of a signed command: MQTT 5 user properties, or else
    the envelope (agent/signing.py)."""
    signature = sign(signer.key, topic, payload)
    if not mqtt5:
        return envelope(payload, signer.key_id, signature), None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [
        (KEY_ID_PROPERTY, signer.key_id),
        (SIGNATURE_PROPERTY, base64.b64encode(signature).decode()),
    ]
    return payload, properties


async def _exchange(
    target: _Target,
    args: argparse.Namespace,
    body: dict[str, Any],
    signer: _Signer | None,
    seen: list[str],
    *,
    mqtt5: bool,
) -> int:
    request_id = body["request_id"]
    topics = target.topics
    topic = topics.command(args.camera, args.stream, args.command)
    payload, properties = _encode(body), None
    if signer is not None:
        payload, properties = _signed(topic, payload, signer, mqtt5=mqtt5)
    async with _connected(target, mqtt5=mqtt5) as client:
        await client.subscribe(topics.events, qos=1)
        await client.publish(topic, payload, qos=1, properties=properties)
        async for message in client.messages:
            # events are never retained: a retained one is stale or someone else's
            if message.retain or not message.topic.matches(topics.events):
                continue
            payload = payload_bytes(message)
            event = decode_event(payload)
            if event is None or event.request_id != request_id:
                continue
            seen.append(event.state)
            print(payload.decode(), flush=True)
            if event.terminal:
                return _outcome(args.command, event)
    raise ClientExit(EXIT_BROKER, f"lost the connection to {target.where}")


def _encode(body: dict[str, Any]) -> bytes:
    """MessagePack when the command carries a model (raw bytes), readable JSON otherwise."""
    if "model" in body:
        return msgspec.msgpack.encode(body)
    return msgspec.json.encode(body)


def decode_event(payload: bytes) -> Event | None:
    """The request event in `payload`; None for anything else (never raises)."""
    try:
        return _event_decoder.decode(payload)
    # ValidationError is a DecodeError; bad UTF-8 and deep nesting raise their own errors
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def _outcome(command: str, event: Event) -> int:
    if event.state == "succeeded":
        return EXIT_OK
    why = f" ({event.error.code}): {event.error.message}" if event.error else ""
    if event.superseded_by:
        why = f" by {event.superseded_by}"
    print(f"oak-agent {command}: request {event.request_id} {event.state}{why}", file=sys.stderr)
    return EXIT_FAILED


async def _watch(target: _Target, args: argparse.Namespace) -> int:
    """Print each message under the agent's base topic once."""
    wanted = f"{target.topics.base}/#"
    style: Style = "raw" if args.raw else "pretty" if sys.stdout.isatty() else "compact"
    retained: dict[str, bytes] = {}
    printed = 0
    with anyio.move_on_after(args.timeout):
        async with _connected(target) as client:
            await client.subscribe(wanted, qos=1)
            async for message in client.messages:
                if not message.topic.matches(wanted):
                    continue
                topic, payload = message.topic.value, payload_bytes(message)
                if message.retain:
                    # amqtt can send a retained message both on connect and on subscribe
                    if args.no_retained or retained.get(topic) == payload:
                        continue
                    retained[topic] = payload
                print(f"{topic} {render(payload, style)}", flush=True)
                printed += 1
                if args.count and printed >= args.count:
                    return EXIT_OK
            raise ClientExit(EXIT_BROKER, f"lost the connection to {target.where}")
    if args.count and printed < args.count:
        raise ClientExit(
            EXIT_TIMEOUT, f"{printed} of {args.count} messages within {args.timeout:g} s"
        )
    return EXIT_OK


async def _status(target: _Target, args: argparse.Namespace) -> int:
    """Print the overview table of what the broker retains under the prefix."""
    prefix = target.topics.prefix
    agent = None if target.agent == "+" else target.agent
    try:
        retained = await collect_retained(
            target.broker,
            overview.filters(prefix, agent),
            quiet=_STATUS_QUIET,
            limit=args.timeout,
            client_prefix="oak-agent-status",
        )
    except aiomqtt.MqttError as exc:
        problem = connect_problem(exc, target.broker)
        if problem is None:
            _refused(exc, target)
        raise ClientExit(EXIT_BROKER, problem.message) from None
    table = overview.rows(prefix, retained)
    if not table:
        who = f"agent {agent!r}" if agent else "agent"
        raise ClientExit(EXIT_FAILED, f"no {who} found under {prefix}/ on {target.where}")
    style = args.format
    if style == "auto":
        style = "table" if sys.stdout.isatty() else "plain"
    if style == "json":
        print(overview.to_json(table).decode(), flush=True)
    elif style == "table":
        from rich.console import Console  # noqa: PLC0415  # rich only for a terminal

        Console(force_terminal=True).print(overview.rich_table(table))
    else:
        print(overview.plain_table(table), flush=True)
    return EXIT_OK
