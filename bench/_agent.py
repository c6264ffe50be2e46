"""The agent's `serve()` in its own process, with the benchmark-only switches of the old ways.

    python -m bench._agent --config agent.toml [--one-write-per-command] [--sequential-commands]

What `oak-agent run` does, plus: with `--one-write-per-command` every command waits for its
own state write before the next is handled, the baseline of `bench.commands`; with
`--sequential-commands` commands are handled one at a time whatever their camera, the
baseline of `bench.overtake`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from pathlib import Path

import anyio

from agent.app import serve
from agent.config import load_config
from agent.logs import setup_logging


async def _run(config_path: Path, *, group_writes: bool, concurrent_commands: bool) -> None:
    config = load_config(config_path)
    async with anyio.create_task_group() as tg:
        await tg.start(
            partial(
                serve,
                config,
                source=config_path,
                group_writes=group_writes,
                concurrent_commands=concurrent_commands,
            )
        )
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._agent")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--one-write-per-command", action="store_true")
    parser.add_argument("--sequential-commands", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("warning", "json")
    anyio.run(
        partial(
            _run,
            args.config,
            group_writes=not args.one_write_per_command,
            concurrent_commands=not args.sequential_commands,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
