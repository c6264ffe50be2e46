"""The agent's `serve()` plus a probe task in the same event loop, in its own process.

    python -m bench._lagprobe --config agent.toml --out lag.json [--no-agent]

The probe sleeps 2 ms at a time and records how late it woke (wall time, lag in seconds),
from before `serve()` is called until SIGTERM; samples are written to --out on exit.
`--no-agent` runs the probe alone: the loop's own noise floor on this machine.
Imports happen before the loop exists, so they are start-up time, not loop lag.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Final

import anyio

from agent.app import serve
from agent.config import load_config
from agent.logs import setup_logging

_INTERVAL: Final = 0.002


async def _probe(samples: list[tuple[float, float]]) -> None:
    while True:
        before = time.perf_counter()
        await anyio.sleep(_INTERVAL)
        samples.append((time.time(), time.perf_counter() - before - _INTERVAL))


async def _run(config_path: Path, samples: list[tuple[float, float]], *, agent: bool) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_probe, samples, name="bench.lagprobe")
        if agent:
            await tg.start(partial(serve, load_config(config_path), source=config_path))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._lagprobe")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-agent", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("warning", "json")
    samples: list[tuple[float, float]] = []
    try:
        anyio.run(partial(_run, args.config, samples, agent=not args.no_agent))
    finally:
        args.out.write_text(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
