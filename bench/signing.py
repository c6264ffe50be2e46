"""What checking a command's signature costs: the boundary's signature step by payload size.

    .venv/bin/python -m bench.signing [--sizes 200,1048576,20971520 --reps 5]

Measured: `find_signature` + `Policy.check` (Ed25519 over the topic and the payload, via
`cryptography`), the way `agent/commands.py` runs it, for a signature in MQTT 5 user
properties and in the 3.1.1 envelope (which adds unpacking the payload). Baseline, in the
same run: sha256 of the same payload, which the agent computes anyway for every model it
stores (hashing is what a signature check mostly is). Payloads over 1 MiB are checked in a
worker thread, off the event loop; below, on it. Pure CPU, one thread, no broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.signing import (
    KEY_ID_PROPERTY,
    SIGNATURE_PROPERTY,
    Policy,
    TrustedKey,
    envelope,
    find_signature,
    sign,
)
from bench._common import Row, Table, cli, median

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Options", "measure"]

_TOPIC: Final = "oak/bench/cameras/14442C10D13EABCE00/streams/CAM_A/nn/deploy"
_CAMERA: Final = "14442C10D13EABCE00"


@dataclass(frozen=True, slots=True)
class Options:
    sizes: tuple[int, ...] = (200, 1024 * 1024, 20 * 1024 * 1024)
    reps: int = 5


def _seconds(work: Callable[[], object], reps: int) -> float:
    """Median wall time of `work` over `reps` runs (after one warm-up)."""
    work()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return median(times)


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB" if n >= 1024 * 1024 else f"{n} B"


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def measure(options: Options) -> Table:
    key = Ed25519PrivateKey.generate()
    policy = Policy(keys={"ops": TrustedKey("ops", key.public_key())}, require_signed=True)
    rows = []
    for size in options.sizes:
        payload = os.urandom(size)
        signature = sign(key, _TOPIC, payload)
        properties = [
            (KEY_ID_PROPERTY, "ops"),
            (SIGNATURE_PROPERTY, base64.b64encode(signature).decode()),
        ]
        wrapped = envelope(payload, "ops", signature)

        def by_properties(p: bytes = payload, props: list[tuple[str, str]] = properties) -> None:
            policy.check(_TOPIC, _CAMERA, find_signature(p, props))

        def by_envelope(w: bytes = wrapped) -> None:
            policy.check(_TOPIC, _CAMERA, find_signature(w, []))

        def sha256(p: bytes = payload) -> None:
            hashlib.sha256(p).digest()

        baseline = _seconds(sha256, options.reps)
        for how, work in (("user properties", by_properties), ("envelope", by_envelope)):
            took = _seconds(work, options.reps)
            rows.append(
                Row(
                    f"{_size(size)}, {how}",
                    _time(took),
                    f"{_time(baseline)} (sha256)",
                    f"{took / baseline:.1f}x",
                )
            )
    return Table(
        "signature check per command, by payload size",
        rows,
        notes=[
            f"median of {options.reps} runs after a warm-up; one thread",
            "payloads over 1 MiB are checked in a worker thread (agent/commands.py)",
        ],
    )


if __name__ == "__main__":
    raise SystemExit(cli("signing", measure, Options, __doc__))
