"""Head-of-line blocking: a tiny deploy to camera B sent right behind camera A's 20 MB model.

    .venv/bin/python -m bench.overtake [--reps 7 --size 20]

Each rep publishes (QoS 1, one after the other, each awaited until mosquitto has it) a
MessagePack deploy with a fresh 20 MB inline model to camera A, then one with a fresh
13 KB model to camera B. The agent hashes, writes + fsyncs and parses A's model in threads:
camera B's command is handled meanwhile. Baseline, in the same run: the agent with
`concurrent_commands=False` (`bench/_agent.py --sequential-commands`), one command at a
time whatever its camera, as before. Measured in the bench process: publish -> `accepted`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import msgspec

from bench._common import BLOBS, YOLO, Row, Table, bench_site, cli, median, mxids

if TYPE_CHECKING:
    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_MB: Final = 1024 * 1024
_BOOT: Final = 0.3


@dataclass(frozen=True, slots=True)
class Options:
    reps: int = 7
    size: int = 20  # MB, camera A's model


@dataclass(frozen=True, slots=True)
class Rep:
    b_accepted: float  # ms, B's publish -> B's `accepted`
    a_accepted: float  # ms, A's publish -> A's `accepted`
    b_first: bool  # B's `accepted` arrived before A's


def _blob(size: int) -> bytes:
    base = (BLOBS / "yolo_tiny.blob").read_bytes()
    return base + os.urandom(max(16, size - len(base)))  # a new model every time


async def _reps(options: Options, watcher: Watcher, agent: Process, a: str, b: str) -> list[Rep]:
    reps = []
    for n in range(options.reps):
        big = {"request_id": f"a{n}", "nn_config": YOLO, "model": _blob(options.size * _MB)}
        tiny = {"request_id": f"b{n}", "nn_config": YOLO, "model": _blob(0)}
        big_payload, tiny_payload = msgspec.msgpack.encode(big), msgspec.msgpack.encode(tiny)
        a_sent = await watcher.deploy(a, "CAM_A", big, payload=big_payload)
        b_sent = await watcher.deploy(b, "CAM_A", tiny, payload=tiny_payload)
        b_at, _ = await watcher.wait_for(partial(watcher.event, f"b{n}", "accepted"), "B")
        a_at, _ = await watcher.wait_for(partial(watcher.event, f"a{n}", "accepted"), "A")
        await watcher.succeeded(f"a{n}")
        await watcher.succeeded(f"b{n}")
        reps.append(Rep((b_at - b_sent) * 1000, (a_at - a_sent) * 1000, b_at < a_at))
        agent.check()
    return reps


def measure(options: Options) -> Table:
    a, b = mxids(2)
    results: dict[bool, list[Rep]] = {}
    with bench_site("overtake") as site:
        for concurrent in (False, True):  # the baseline first
            config, topics = site.config(cameras=[a, b], boot_seconds=_BOOT, fps=2.0)
            argv = [sys.executable, "-m", "bench._agent", "--config", str(config)]
            if not concurrent:
                argv.append("--sequential-commands")

            async def job(watcher: Watcher, agent: Process) -> list[Rep]:
                return await _reps(options, watcher, agent, a, b)

            results[concurrent] = site.run_agent(config, topics, job, cameras=[a, b], argv=argv)
    now, before = results[True], results[False]
    b_now, b_before = median([r.b_accepted for r in now]), median([r.b_accepted for r in before])
    first_now, first_before = sum(r.b_first for r in now), sum(r.b_first for r in before)
    rows = [
        Row(
            f"tiny deploy to B behind A's {options.size} MB: B accepted p50 / max",
            f"{b_now:.1f} / {max(r.b_accepted for r in now):.1f} ms",
            f"{b_before:.1f} / {max(r.b_accepted for r in before):.1f} ms one at a time",
            f"{b_before / b_now:.1f}x",
        ),
        Row(
            f"  A's {options.size} MB deploy accepted p50",
            f"{median([r.a_accepted for r in now]):.1f} ms",
            f"{median([r.a_accepted for r in before]):.1f} ms",
        ),
        Row(
            "  B accepted before A",
            f"{first_now} of {len(now)}",
            f"{first_before} of {len(before)}",
            "",
            "every rep",
            first_now == len(now),
        ),
    ]
    notes = [
        f"{options.reps} reps per agent, each with new models (MessagePack, inline); "
        f"two simulated cameras booting {_BOOT:g} s; both published back to back, QoS 1",
        "accepted = publish -> the `accepted` event in this process; B's includes waiting "
        "for A's payload ahead of it on the broker's connection to the agent",
    ]
    return Table("overtake: one camera's large model does not hold up another", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("overtake", measure, Options, __doc__))
