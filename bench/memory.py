"""Agent memory under large command payloads: peak RSS and RSS once it is idle again.

    .venv/bin/python -m bench.memory [--limit-mib 32 --settle 3.0]

A fresh agent per scenario (VmHWM is a per-process peak), `agent.max_payload_bytes` at its
default (32 MiB). Scenarios: one 100 MiB deploy (over the limit), three 250 MB deploys
published at once (over it), ten 20 MB deploys published at once (under it: each a new
model, hashed, stored and parsed). Each ends with a small barrier command; the agent handles
commands in order, so its answer means every large one was dealt with. `RSS after` is VmRSS
`--settle` seconds after that answer. Baseline: the same agent's RSS while idle before.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import anyio
import msgspec

from bench._common import BLOBS, YOLO, Row, Table, bench_site, cli

if TYPE_CHECKING:
    from bench._common import Process, Watcher

__all__ = ["Options", "measure"]

_CAMERA: Final = "14442C10D13EABCE00"
_MB: Final = 1_000_000
_MIB: Final = 1024 * 1024
_SEND: Final = 120.0  # seconds for the broker to take a large publish


@dataclass(frozen=True, slots=True)
class Options:
    settle: float = 3.0


@dataclass(frozen=True, slots=True)
class _Scenario:
    name: str
    count: int
    size: int  # bytes of model per command


_SCENARIOS: Final = (
    _Scenario("1 x 100 MiB (over the limit)", 1, 100 * _MIB),
    _Scenario("3 x 250 MB at once (over the limit)", 3, 250 * _MB),
    _Scenario("10 x 20 MB at once (under the limit)", 10, 20 * _MB),
)


@dataclass(frozen=True, slots=True)
class _Memory:
    idle_kib: int
    peak_kib: int
    after_kib: int
    answers: dict[str, int]


def _payloads(scenario: _Scenario) -> list[bytes]:
    blob = (BLOBS / "yolo_tiny.blob").read_bytes()
    rng = random.Random(scenario.size)
    out = []
    for n in range(scenario.count):
        # a real blob followed by random bytes: a distinct model that depthai still parses
        model = blob + rng.randbytes(scenario.size - len(blob))
        body = {"request_id": f"big-{n}", "nn_config": YOLO, "model": model}
        out.append(msgspec.msgpack.encode(body))
    return out


async def _run(watcher: Watcher, agent: Process, payloads: list[bytes], settle: float) -> _Memory:
    idle = agent.kib("VmRSS")
    topic = watcher.topics.command(_CAMERA, "CAM_A", "deploy")
    async with anyio.create_task_group() as tg:
        for payload in payloads:
            tg.start_soon(partial(watcher.client.publish, topic, payload, qos=1, timeout=_SEND))
    barrier = f"barrier-{uuid.uuid4().hex[:6]}"
    await watcher.client.publish(
        watcher.topics.command(_CAMERA, "CAM_B", "delete"),
        msgspec.json.encode({"request_id": barrier}),
        qos=1,
    )
    await watcher.outcome(barrier)
    await anyio.sleep(settle)
    answers: dict[str, int] = {}
    for n in range(len(payloads)):
        found = watcher.terminal(f"big-{n}") or watcher.event(f"big-{n}", "accepted")
        state: str = "no answer" if found is None else found[1].state
        if found is not None and found[1].error is not None:
            state = f"{state} {found[1].error.code}"
        answers[state] = answers.get(state, 0) + 1
    return _Memory(idle, agent.kib("VmHWM"), agent.kib("VmRSS"), answers)


def measure(options: Options) -> Table:
    rows = []
    with bench_site("memory") as site:
        for scenario in _SCENARIOS:
            payloads = _payloads(scenario)
            config, topics = site.config(cameras=[_CAMERA], fps=5.0)

            async def job(
                watcher: Watcher, agent: Process, payloads: list[bytes] = payloads
            ) -> _Memory:
                return await _run(watcher, agent, payloads, options.settle)

            found = site.run_agent(config, topics, job, cameras=[_CAMERA])
            del payloads
            answers = ", ".join(f"{n} {state}" for state, n in sorted(found.answers.items()))
            rows += [
                Row(
                    f"{scenario.name}: peak RSS",
                    f"{found.peak_kib / 1024:.0f} MB",
                    f"idle {found.idle_kib / 1024:.0f} MB",
                    f"{found.peak_kib / found.idle_kib:.1f}x",
                ),
                Row(f"  RSS {options.settle:g} s after", f"{found.after_kib / 1024:.0f} MB"),
                Row("  answers", answers),
            ]
    return Table(
        "memory: large command payloads (max_payload_bytes 32 MiB)",
        rows,
        notes=[
            "peak RSS = VmHWM of the agent process; a fresh agent per scenario",
            "MQTT 5: the agent announces Maximum Packet Size, so the broker drops what is "
            "over it and no answer comes (see README, Configuration)",
        ],
    )


def main() -> int:
    return cli("memory", measure, Options, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
