"""Real MQTT brokers for the tests: mosquitto on a free loopback port, or amqtt as fallback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Broker", "BrokerUnavailable", "free_port", "mosquitto_path", "run_broker"]

_START_TIMEOUT = 10.0


class BrokerUnavailable(RuntimeError):
    """The requested broker cannot be started on this machine."""


@dataclass(frozen=True, slots=True)
class Broker:
    kind: Literal["mosquitto", "amqtt"]
    host: str
    port: int
    pid: int

    @property
    def mqtt5(self) -> bool:
        return self.kind == "mosquitto"

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        return "5" if self.mqtt5 else "3.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerUnavailable(f"broker exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise BrokerUnavailable(f"broker did not listen on port {port} within {_START_TIMEOUT} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # graceful: mosquitto writes its persistence file
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _mosquitto_command(
    workdir: Path, port: int, persistence: bool, settings: tuple[str, ...] | None
) -> list[str]:
    binary = mosquitto_path()
    if binary is None:
        raise BrokerUnavailable("mosquitto is not installed")
    conf = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        *(settings if settings is not None else ("allow_anonymous true",)),
        "set_tcp_nodelay true",  # no Nagle stalls with many QoS 1 publishes
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest none",
    ]
    if os.geteuid() == 0:  # else mosquitto drops to its own user, which cannot write here
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    return [binary, "-c", str(conf)]


def _amqtt_command(port: int) -> list[str]:
    code = (
        "import anyio, sys\n"
        "from agent.broker import embedded_broker\n"
        "async def main():\n"
        f"    async with embedded_broker('127.0.0.1', {port}):\n"
        "        await anyio.sleep_forever()\n"
        "anyio.run(main)\n"
    )
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def run_broker(
    kind: Literal["mosquitto", "amqtt"],
    workdir: Path,
    *,
    port: int | None = None,
    persistence: bool = False,
    settings: tuple[str, ...] | None = None,
) -> Iterator[Broker]:
    """Start a broker process on 127.0.0.1 and stop it (by PID) on exit.

    `settings` (mosquitto only): config lines for its listener instead of `allow_anonymous
    true`, e.g. TLS files, `protocol websockets`, a password file and an ACL.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "mosquitto":
        command = _mosquitto_command(workdir, port, persistence, settings)
    elif settings is not None:
        raise BrokerUnavailable("listener settings need mosquitto")
    else:
        command = _amqtt_command(port)
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        _wait_listening(port, process)
        yield Broker(kind=kind, host="127.0.0.1", port=port, pid=process.pid)
    finally:
        _stop(process)
