"""Command line: argv -> config -> logging -> run; exit codes.

oak-agent run --config PATH        the daemon
oak-agent deploy|delete|watch ...  a small MQTT client for trying the agent out
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from pathlib import Path

import anyio
import structlog

from agent.config import ConfigError, load_config
from agent.logs import setup_logging

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

log = structlog.get_logger(__name__)


async def _run_until_signalled(config_path: Path) -> None:
    from agent.app import serve  # noqa: PLC0415  # keep `oak-agent --help` fast

    config = load_config(config_path)
    async with anyio.create_task_group() as tg:
        app = await tg.start(partial(serve, config, source=config_path))
        if sys.stderr.isatty():
            lines = [f"  {what}:\n    {command}" for what, command in app.hints.items()]
            sys.stderr.write("\nTry it (in another terminal):\n" + "\n".join(lines) + "\n\n")
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                break


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oak-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, required=True, help="TOML config file")
    from agent.client import add_client_commands  # noqa: PLC0415

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "run":
            anyio.run(_run_until_signalled, args.config)
            return EXIT_OK
        from agent.client import run_client_command  # noqa: PLC0415

        return run_client_command(args)
    except ConfigError as exc:
        log.error("configuration error", error=str(exc))  # noqa: TRY400  # no traceback wanted
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
