"""A small MQTT client for the agent: deploy, delete, watch, upload, models.

It reaches the agent with `--host/--port/--prefix/--agent`, or reads them from the agent's
own TOML (`--config`; flags override it). It talks MQTT 3.1.1, so it works with the embedded
demo broker too; `deploy --model` and `upload` try MQTT 5 first (unless the config says
3.1.1), to read the broker's Maximum Packet Size from its CONNACK, and fall back to 3.1.1
when the broker refuses it. A model whose deploy would not fit in one packet goes in chunks
(`agent/sender.py`) before a deploy by sha256. It acts only on messages on the topics it
subscribed to (amqtt also sends a new client the retained messages other clients subscribed
to), skips what does not decode, and reports an expected failure as one line on stderr and
an exit code.
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
from agent.bars import progress_bar
from agent.chunkplan import MIN_CHUNK_SIZE, chunk_size_for, publish_packet_size
from agent.config import AgentSection, ConfigError, MqttSection, load_config
from agent.connect import BrokerOptions, broker_options, connect_problem
from agent.keyfiles import config_snippet, key_id_of, read_signing_key, write_key_pair
from agent.messages import Event, ModelEntry, UploadStatus
from agent.mqtt import payload_bytes
from agent.paho_fast import on_connack
from agent.render import Style, render
from agent.render import size as human_size
from agent.retained import collect_retained
from agent.sender import ModelFile, send_model, sha256_of
from agent.signing import KEY_ID_PROPERTY, KEY_ID_RE, SIGNATURE_PROPERTY, envelope, sign
from agent.topics import SHA256_RE, Topics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

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
    "decode_models",
    "run_client_command",
    "sha256_argument",
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
DEFAULT_UPLOAD_TIMEOUT = 600.0
DEFAULT_MODELS_TIMEOUT = 10.0
DEFAULT_STATUS_TIMEOUT = 5.0
_STATUS_QUIET = 0.5  # status: the retained messages are in once none came for this long
DEFAULT_EXPIRES_IN = 60.0  # a signed command's expires_at, from now
_CONNECT_TIMEOUT = 10.0
_LEVEL = re.compile(r"[A-Za-z0-9._-]{1,64}")
# CONNACK return codes of MQTT 3.1.1
_REFUSALS = {
    1: "unsupported protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorised",
}

# CONNACK refusals of an MQTT 5 CONNECT by a broker that speaks only 3.1.1 (3.1.1's and 5's
# "unsupported protocol version")
_V5_UNSUPPORTED = frozenset({1, 132})

_event_decoder = msgspec.json.Decoder(Event)
_models_decoder = msgspec.json.Decoder(tuple[ModelEntry, ...])


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
    # MQTT 5 unless the agent's broker speaks 3.1.1: signed commands go in user properties,
    # and the CONNACK names the broker's Maximum Packet Size
    mqtt5: bool = True
    max_payload: int = AgentSection().max_payload_bytes  # the agent's, from its config
    # the agent's [security] max_command_age, when its config is given
    max_command_age: float | None = None

    @property
    def where(self) -> str:
        return self.broker.where


@dataclass(slots=True)
class _Link:
    """A connected client, and what its CONNACK said."""

    client: aiomqtt.Client
    mqtt5: bool = False
    max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5)


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


def _bytes(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of bytes (1, 2, ...)")
    return int(value)


def _chunk_bytes(value: str) -> int:
    if not value.isdigit() or int(value) < MIN_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"{value!r}: a chunk has at least {MIN_CHUNK_SIZE} bytes")
    return int(value)


def sha256_argument(value: str) -> str:
    """argparse type: a sha256 in hex (64 digits, either case), lower-cased."""
    if not SHA256_RE.fullmatch(value.lower()):
        raise argparse.ArgumentTypeError(f"{value!r} is not a sha256 (64 hex digits)")
    return value.lower()


def _transfer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-packet",
        type=_bytes,
        metavar="BYTES",
        help="the broker's largest packet, for MQTT 3.1.1 brokers (MQTT 5 ones say it)",
    )
    parser.add_argument(
        "--chunk-size",
        type=_chunk_bytes,
        metavar="BYTES",
        help="bytes per chunk (default: the most the broker's packet limit allows, <= 1 MiB)",
    )


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
    _signing_options(parser)


def _signing_options(parser: argparse.ArgumentParser, *, what: str = "command") -> None:
    signing = parser.add_argument_group("signed commands ([security] in the agent's config)")
    signing.add_argument(
        "--sign-key",
        type=Path,
        metavar="FILE",
        help=f"sign the {what} with this Ed25519 private key (PEM, from `oak-agent keygen`)",
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
        help=f"the {what}'s expires_at, from now (default when signed: "
        f"{DEFAULT_EXPIRES_IN:g}, or the agent's max_command_age from --config when smaller)",
    )


def add_client_commands(sub: Any) -> None:
    """Add `deploy`, `delete`, `upload`, `models`, `watch` and `status` to the subcommands."""
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
    source = deploy.add_argument_group("the model: --model, --model-url, or --model-sha256 alone")
    source.add_argument(
        "--model",
        type=Path,
        metavar="BLOB",
        help="a MyriadX .blob file, sent with the command, or in chunks first when the "
        "command would not fit in one packet of the broker",
    )
    source.add_argument(
        "--model-url",
        metavar="URL",
        help="an http(s) URL the agent downloads the model from (with --model-sha256)",
    )
    source.add_argument(
        "--model-sha256",
        type=sha256_argument,
        metavar="SHA256",
        help="the model's sha256: alone, a model the agent already stores",
    )
    source.add_argument(
        "--model-size", type=_bytes, metavar="BYTES", help="with --model-url: its size"
    )
    _transfer_options(deploy)
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

    upload = sub.add_parser(
        "upload",
        parents=[common],
        help="upload a model in chunks without deploying it; resumes an interrupted upload",
        description=(
            "Send a model to the agent in chunks (the README's chunk protocol) and wait until "
            "it is stored. The agent keeps what it received: run the same command again after "
            "an interruption and only the missing chunks are sent. Deploy it afterwards with "
            "`deploy --model-sha256`."
        ),
        epilog=EXIT_CODES_HELP.replace("the request succeeded", "the model is stored"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    upload.add_argument("--model", type=Path, required=True, metavar="BLOB", help="the .blob file")
    upload.add_argument("--name", help="a name for the model list (default: the file's name)")
    _transfer_options(upload)
    _signing_options(upload, what="manifest (re-signed each time it is sent)")
    upload.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_UPLOAD_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the model to be stored (default %(default)g)",
    )
    upload.set_defaults(parser=upload)

    models = sub.add_parser(
        "models",
        parents=[common],
        help="list the models the agent stores",
        description="Print the agent's retained model list ({prefix}/{agent}/models).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    models.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_MODELS_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the list (default %(default)g)",
    )
    models.set_defaults(parser=models)

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
    """Run `deploy`, `delete`, `upload`, `models`, `watch`, `status` or `keygen`; the exit code."""
    parser: argparse.ArgumentParser = args.parser
    if args.command == "keygen":
        return _keygen(args)
    try:
        target = _target(args)
        if args.command == "deploy":
            _check_deploy_source(args)
        signer = _signer(args) if args.command in ("deploy", "delete", "upload") else None
    except ClientExit as exc:
        parser.error(exc.message)  # usage and exit 2
    try:
        if args.command == "status":
            outcome = anyio.run(_until_signalled, lambda: _status(target, args))
            return EXIT_INTERRUPTED if outcome is None else outcome
        if args.command == "watch":
            outcome = anyio.run(_until_signalled, lambda: _watch(target, args))
            return EXIT_OK if outcome is None else outcome
        if args.command == "models":
            outcome = anyio.run(_until_signalled, lambda: _models(target, args))
            return EXIT_INTERRUPTED if outcome is None else outcome
        if args.command == "upload":
            model = _model_file(args.model)
            outcome = anyio.run(_until_signalled, lambda: _upload(target, args, model, signer))
            if outcome is None:
                print(
                    "oak-agent upload: interrupted; run the same command again to send only "
                    "what the agent is missing",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            return outcome
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


def _check_deploy_source(args: argparse.Namespace) -> None:
    """One model source: --model, --model-url with --model-sha256, or --model-sha256."""
    if args.model is not None and (args.model_url is not None or args.model_sha256 is not None):
        raise ClientExit(EXIT_USAGE, "--model goes alone: not with --model-url or --model-sha256")
    if args.model_url is not None and args.model_sha256 is None:
        raise ClientExit(EXIT_USAGE, "--model-url needs --model-sha256 (the agent checks it)")
    if args.model_size is not None and args.model_url is None:
        raise ClientExit(EXIT_USAGE, "--model-size goes with --model-url")
    if args.model is None and args.model_sha256 is None:
        raise ClientExit(EXIT_USAGE, "one of --model, --model-url or --model-sha256 is required")


def _model_file(path: Path) -> ModelFile:
    try:
        model = sha256_of(path)
    except OSError as exc:
        raise ClientExit(EXIT_USAGE, f"cannot read {path}: {exc.strerror}") from None
    if model.size == 0:
        raise ClientExit(EXIT_USAGE, f"{path} is empty")
    return model


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
        max_payload=config.agent.max_payload_bytes if config else AgentSection().max_payload_bytes,
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
            if args.model_url is not None:
                body["model_url"] = args.model_url
                if args.model_size is not None:
                    body["model_size"] = args.model_size
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


@contextlib.asynccontextmanager
async def _connected(target: _Target, *, mqtt5: bool = False) -> AsyncIterator[_Link]:
    """A connected client; broker problems become a `ClientExit` naming host:port.

    With `mqtt5`, MQTT 5 first (to read the broker's Maximum Packet Size), and 3.1.1 when
    the broker refuses 5.
    """
    link = _Link(client=_client(target, mqtt5=mqtt5), mqtt5=mqtt5)
    if mqtt5:
        on_connack(link.client, lambda limit: setattr(link, "max_packet", limit))
    try:
        await link.client.__aenter__()
    except aiomqtt.MqttError as exc:
        if not (mqtt5 and _refuses_v5(exc)):
            problem = connect_problem(exc, target.broker)
            if problem is None:
                _refused(exc, target)
            raise ClientExit(EXIT_BROKER, problem.message) from None
        link.mqtt5 = False
    if not link.mqtt5 and mqtt5:  # the broker speaks 3.1.1 only
        async with _connected(target) as fallback:
            yield fallback
        return
    try:
        yield link
    except aiomqtt.MqttError as exc:
        raise ClientExit(EXIT_BROKER, f"lost the connection to {target.where}: {exc}") from None
    finally:
        with anyio.move_on_after(2, shield=True):
            with contextlib.suppress(aiomqtt.MqttError):  # already gone: nothing to close
                await link.client.__aexit__(None, None, None)


def _client(target: _Target, *, mqtt5: bool) -> aiomqtt.Client:
    return aiomqtt.Client(
        **target.broker.client_kwargs(),
        identifier=f"oak-agent-cli-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311,
        timeout=_CONNECT_TIMEOUT,
    )


def _refuses_v5(exc: aiomqtt.MqttError) -> bool:
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    rc = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
    return rc in _V5_UNSUPPORTED


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
    """Publish one command, print its events; the exit code of its final state.

    A deploy whose model would not fit in one packet of the broker uploads it in chunks
    first, then names it by sha256. A signed command carries its signature in MQTT 5 user
    properties, or in an envelope on a 3.1.1 broker (agent/signing.py).
    """
    request_id = body["request_id"]
    topics = target.topics
    seen: list[str] = []
    topic = topics.command(args.camera, args.stream, args.command)
    uploading = False
    try:
        with anyio.fail_after(args.timeout):
            wants5 = target.mqtt5 and ("model" in body or signer is not None)
            async with _connected(target, mqtt5=wants5) as link:
                client = link.client
                payload, properties = _message(topic, body, signer, mqtt5=link.mqtt5)
                limit = args.max_packet if args.command == "deploy" else None
                limit = limit or link.max_packet
                packet = publish_packet_size(topic, len(payload), mqtt5=link.mqtt5)
                packet += _properties_size(properties)
                if "model" in body and limit is not None and packet > limit:
                    uploading = True
                    model = _model_file(args.model)
                    print(
                        f"oak-agent deploy: the command ({human_size(packet)}) does not fit "
                        f"the broker's packet limit ({human_size(limit)}): sending the model "
                        "in chunks first",
                        file=sys.stderr,
                    )
                    status = await _send(
                        target, args, link, model, limit=limit, request_id=request_id, signer=signer
                    )
                    if status.state != "stored":
                        return _upload_failed("deploy", model, status)
                    uploading = False
                    body = {k: v for k, v in body.items() if k != "model"}
                    body["model_sha256"] = model.sha256
                    payload, properties = _message(topic, body, signer, mqtt5=link.mqtt5)
                await client.subscribe(topics.events, qos=1)
                await client.publish(topic, payload, qos=1, properties=properties)
                with _transfer_bar(request_id) as show:
                    async for message in client.messages:
                        # events are never retained: a retained one is stale or someone else's
                        if message.retain or not message.topic.matches(topics.events):
                            continue
                        raw = payload_bytes(message)
                        event = decode_event(raw)
                        if event is None or event.request_id != request_id:
                            continue
                        seen.append(event.state)
                        print(raw.decode(), flush=True)
                        if event.progress is not None:
                            show(event.progress.received, event.progress.total)
                        if event.terminal:
                            return _outcome(args.command, event)
    except TimeoutError:
        waited = f"within {args.timeout:g} s"
        if uploading:
            raise ClientExit(
                EXIT_TIMEOUT,
                f"the model was not stored {waited}; run the same command again to send only "
                "what the agent is missing (or raise --timeout)",
            ) from None
        if seen:
            raise ClientExit(
                EXIT_TIMEOUT, f"request {request_id} is still {seen[-1]}: no final answer {waited}"
            ) from None
        raise ClientExit(
            EXIT_TIMEOUT,
            f"no answer from agent {target.agent!r} on {target.where} {waited} "
            f"(is it running? `oak-agent watch` shows what it publishes)",
        ) from None
    raise ClientExit(EXIT_BROKER, f"lost the connection to {target.where}")


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


def _message(
    topic: str, body: dict[str, Any], signer: _Signer | None, *, mqtt5: bool
) -> tuple[bytes, Properties | None]:
    """The payload (and properties) of a command, signed when there is a signer."""
    payload = _encode(body)
    if signer is None:
        return payload, None
    return _signed(topic, payload, signer, mqtt5=mqtt5)


def _properties_size(properties: Properties | None) -> int:
    """Bytes the properties add to a PUBLISH (beyond the one byte of an empty set)."""
    if properties is None:
        return 0
    return len(properties.pack()) - 1  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _transfer_bar(request_id: str) -> Iterator[Callable[[int, int | None], None]]:
    """Shows `transferring` progress events on a terminal; nothing otherwise (the events
    themselves are printed)."""
    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    shown: list[Callable[[int, int | None], None]] = []
    with contextlib.ExitStack() as stack:

        def show(done: int, total: int | None) -> None:
            if not shown:
                shown.append(stack.enter_context(progress_bar(f"{request_id} transferring")))
            shown[0](done, total)

        yield show


def _chunk_size(
    args: argparse.Namespace, target: _Target, link: _Link, limit: int | None, model: ModelFile
) -> int:
    """--chunk-size, checked against the packet limit; else the largest that fits."""
    topic = target.topics.chunk(model.sha256, model.size)  # the longest offset
    most = min(target.max_payload, 1 << 30)
    try:
        fits = chunk_size_for(limit, topic, mqtt5=link.mqtt5, limit=most)
    except ValueError as exc:
        raise ClientExit(EXIT_USAGE, str(exc)) from None
    if args.chunk_size is None:
        return fits
    if args.chunk_size > fits:
        raise ClientExit(
            EXIT_USAGE,
            f"--chunk-size {args.chunk_size} does not fit: at most {fits} bytes "
            + (
                f"in a packet of {limit} bytes"
                if limit is not None
                else "(agent.max_payload_bytes)"
            ),
        )
    return args.chunk_size  # type: ignore[no-any-return]


async def _send(
    target: _Target,
    args: argparse.Namespace,
    link: _Link,
    model: ModelFile,
    *,
    limit: int | None,
    request_id: str | None,
    signer: _Signer | None = None,
) -> UploadStatus:
    """Upload `model` in chunks with a progress bar; its last status. With a signer, every
    manifest sent is signed (user properties on MQTT 5, the envelope on 3.1.1)."""
    chunk_size = _chunk_size(args, target, link, limit, model)
    expires_in = args.expires_in
    if expires_in is None and signer is not None:  # as a signed command's
        expires_in = min(DEFAULT_EXPIRES_IN, target.max_command_age or DEFAULT_EXPIRES_IN)
    sign = None
    if signer is not None:
        key = signer

        def sign(topic: str, payload: bytes) -> tuple[bytes, Properties | None]:
            return _signed(topic, payload, key, mqtt5=link.mqtt5)

    name = getattr(args, "name", None) or getattr(args, "model_name", None) or model.path.name
    with progress_bar(f"upload {model.path.name}") as show:
        sent = await send_model(
            link.client,
            target.topics,
            model,
            chunk_size=chunk_size,
            progress=show,
            request_id=request_id,
            model_name=name,
            sign=sign,
            expires_in=expires_in,
        )
    if sent.status is None:
        raise ClientExit(
            EXIT_TIMEOUT,
            f"no answer from agent {target.agent!r} on {target.where} to the upload "
            "(is it running, and does it know chunked uploads?)",
        )
    print(
        f"oak-agent: {model.path.name} sha256 {model.sha256}: {sent.status.state}; sent "
        f"{sent.chunks} chunks of {chunk_size} bytes ({human_size(sent.bytes)})",
        file=sys.stderr,
    )
    return sent.status


def _upload_failed(command: str, model: ModelFile, status: UploadStatus) -> int:
    why = f" ({status.error.code}): {status.error.message}" if status.error else ""
    print(f"oak-agent {command}: upload of {model.path.name} {status.state}{why}", file=sys.stderr)
    return EXIT_FAILED


async def _upload(
    target: _Target, args: argparse.Namespace, model: ModelFile, signer: _Signer | None
) -> int:
    """Upload without deploying; print the final status; exit 0 when stored."""
    try:
        with anyio.fail_after(args.timeout):
            async with _connected(target, mqtt5=target.mqtt5) as link:
                limit = args.max_packet or link.max_packet
                status = await _send(
                    target, args, link, model, limit=limit, request_id=None, signer=signer
                )
    except TimeoutError:
        raise ClientExit(
            EXIT_TIMEOUT,
            f"the model was not stored within {args.timeout:g} s; run the same command again "
            "to send only what the agent is missing",
        ) from None
    print(msgspec.json.encode(status).decode(), flush=True)
    if status.state != "stored":
        return _upload_failed("upload", model, status)
    return EXIT_OK


async def _models(target: _Target, args: argparse.Namespace) -> int:
    """Print the agent's retained model list."""
    topic = target.topics.models
    with anyio.move_on_after(args.timeout):
        async with _connected(target) as link:
            await link.client.subscribe(topic, qos=1)
            async for message in link.client.messages:
                if not message.topic.matches(topic):
                    continue
                raw = payload_bytes(message)
                entries = decode_models(raw)
                if entries is None:
                    continue
                if args.json:
                    print(raw.decode(), flush=True)
                else:
                    _print_models(entries)
                return EXIT_OK
            raise ClientExit(EXIT_BROKER, f"lost the connection to {target.where}")
    raise ClientExit(
        EXIT_TIMEOUT,
        f"agent {target.agent!r} on {target.where} published no model list within "
        f"{args.timeout:g} s (is it running?)",
    )


_MODEL_COLUMNS = ("sha256", "size", "name", "stored", "last used", "in use by", "previous for")


def _print_models(entries: tuple[ModelEntry, ...]) -> None:
    """A table: rich on a terminal, aligned plain columns otherwise (the full sha256)."""
    rows = [
        (
            e.sha256,
            human_size(e.size),
            e.name or "",
            _when(e.stored_at),
            _when(e.last_used),
            ", ".join(e.in_use_by) or "-",
            ", ".join(e.previous_for) or "-",
        )
        for e in entries
    ]
    if sys.stdout.isatty():
        from rich.console import Console  # noqa: PLC0415  # only on a terminal
        from rich.table import Table  # noqa: PLC0415

        table = Table(*_MODEL_COLUMNS, title=f"{len(rows)} models")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(_MODEL_COLUMNS)]
    for row in (_MODEL_COLUMNS, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()


def _when(ts: float) -> str:
    if ts <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _encode(body: dict[str, Any]) -> bytes:
    """MessagePack when the command carries a model (raw bytes), readable JSON otherwise."""
    if "model" in body:
        return msgspec.msgpack.encode(body)
    return msgspec.json.encode(body)


def decode_models(payload: bytes) -> tuple[ModelEntry, ...] | None:
    """The model list in `payload`; None for anything else (never raises)."""
    try:
        return _models_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


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
        async with _connected(target) as link:
            await link.client.subscribe(wanted, qos=1)
            async for message in link.client.messages:
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
