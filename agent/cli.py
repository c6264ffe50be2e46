"""Command line: argv -> config -> logging -> run; exit codes.

oak-agent run --config PATH        the daemon
oak-agent deploy|delete|watch|status ...  a small MQTT client for the agent (client.py)
oak-agent keygen --out DIR         a key pair for signing commands (client.py, keyfiles.py)
oak-agent fleet deploy|delete|status|abort ...  staged rollouts across agents (fleet/)
oak-agent audit --config PATH      the audit log as a table (auditview.py)
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from pathlib import Path

import anyio
import structlog

from agent import __version__
from agent.config import ConfigError, load_config
from agent.logs import setup_logging

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT

DESCRIPTION = """\
Deploy neural networks onto Luxonis OAK cameras over MQTT: `run` the agent,
or talk to a running one with `deploy`, `delete`, `watch` and `status` (`keygen` makes a
key to sign commands with); `audit` prints the commands it received and their outcomes."""
EPILOG = """\
try it without hardware (from the repository; scripts/demo runs the agent with an
embedded broker on 127.0.0.1:1883 and two simulated cameras):
  scripts/demo
  .venv/bin/oak-agent watch --config config/demo.toml
  .venv/bin/oak-agent deploy --config config/demo.toml --camera 14442C10D13EABCE00 \\
      --stream CAM_A --model tests/data/blobs/ssd_tiny.blob --nn-config '{"type": "MobileNet"}'

`oak-agent COMMAND --help` describes each command and its exit codes."""

# what each start-up hint does, for the plain lines printed on a terminal
_HINT_TITLES = {
    "watch": "watch what the agent says",
    "deploy": "deploy a MobileNet-SSD onto the first camera's colour stream, and follow it",
    "delete": "remove it again",
    "deploy_with_mosquitto_pub": "the same deploy with mosquitto_pub (JSON, the blob in base64)",
}

log = structlog.get_logger(__name__)


def _show_hints(hints: dict[str, str]) -> None:
    """Plain copy-paste lines on a terminal; one structured log line otherwise."""
    if not sys.stderr.isatty():
        log.info("try it", **hints)
        return
    lines = [f"  # {_HINT_TITLES.get(key, key)}\n  {command}\n" for key, command in hints.items()]
    sys.stderr.write("\nTry it, in another terminal in this folder:\n\n" + "\n".join(lines) + "\n")
    sys.stderr.flush()


async def _run_until_signalled(config_path: Path) -> None:
    from agent.app import serve  # noqa: PLC0415  # keep `oak-agent --help` fast
    from agent.connect import broker_options  # noqa: PLC0415

    config = load_config(config_path)
    broker = broker_options(config.mqtt)  # reads the password and TLS files: a ConfigError here
    async with anyio.create_task_group() as tg:
        app = await tg.start(partial(serve, config, source=config_path, broker=broker))
        _show_hints(app.hints)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                break


def build_parser() -> argparse.ArgumentParser:
    """The `oak-agent` argument parser with every subcommand."""
    from agent.client import add_client_commands  # noqa: PLC0415
    from agent.fleet.cli import add_fleet_commands  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="oak-agent",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning"],
        help="the agent's log level (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: console on a terminal, JSON lines otherwise (default %(default)s)",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of these:"
    )
    run = sub.add_parser(
        "run",
        help="run the agent (the daemon) until SIGTERM or Ctrl-C",
        description="Run the agent until SIGTERM or Ctrl-C.",
    )
    run.add_argument("--config", type=Path, required=True, help="the agent's TOML config file")
    add_client_commands(sub)
    add_fleet_commands(sub)
    from agent.auditview import add_audit_command  # noqa: PLC0415

    add_audit_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # imports the client: the slow part of a start
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing was sent yet
        return EXIT_INTERRUPTED
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "run":
            anyio.run(_run_until_signalled, args.config)
            return EXIT_OK
        if args.command == "fleet":
            from agent.fleet.cli import run_fleet_command  # noqa: PLC0415

            return run_fleet_command(args)
        if args.command == "audit":
            from agent.auditview import run_audit_command  # noqa: PLC0415

            return run_audit_command(args)
        from agent.client import run_client_command  # noqa: PLC0415

        return run_client_command(args)
    except ConfigError as exc:
        log.error("configuration error", error=str(exc))  # noqa: TRY400  # no traceback wanted
        return EXIT_CONFIG
    except KeyboardInterrupt:  # before the command's own signal handling was in place
        return EXIT_OK if args.command == "run" else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
