"""The real agent as a subprocess (`python -m agent.cli run`), its JSON log kept in a file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.harness import CAM1, CAM2

if TYPE_CHECKING:
    import signal
    from collections.abc import Iterator
    from pathlib import Path

    from tests.brokers import Broker

__all__ = ["AgentProcess", "agent_process", "write_config"]


def write_config(
    path: Path,
    broker: Broker,
    state_dir: Path,
    agent_id: str,
    *,
    protocol: str | None = None,
    boot_seconds: float = 0.3,
    reconnect: tuple[float, float] = (0.1, 0.5),
    mqtt_extra: str = "",
    groups: tuple[str, ...] = (),
    cameras: tuple[tuple[str, str], ...] = ((CAM1, ""), (CAM2, "")),
    extra: str = "",
) -> Path:
    """An agent config with simulated cameras (mxid, name: two unnamed ones by default);
    `mqtt_extra` adds lines to [mqtt], `extra` whole sections at the end."""
    simulated = "".join(
        f"""
[[simulator.cameras]]
mxid = "{mxid}"
name = "{name}"
sensors = {{ CAM_A = "color", CAM_B = "mono", CAM_C = "mono" }}
stereo = [["CAM_B", "CAM_C"]]
boot_seconds = {boot_seconds}
fps = 5
"""
        for mxid, name in cameras
    )
    path.write_text(
        f"""
[agent]
id = "{agent_id}"
state_dir = "{state_dir}"
groups = [{", ".join(f'"{g}"' for g in groups)}]

[mqtt]
host = "{broker.host}"
port = {broker.port}
prefix = "oaktest"
protocol = "{protocol or broker.protocol}"
reconnect_min = {reconnect[0]}
reconnect_max = {reconnect[1]}
{mqtt_extra}
{simulated}
{extra}"""
    )
    return path


@dataclass(frozen=True, slots=True)
class AgentProcess:
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: signal.Signals) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.process.wait(timeout=timeout)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (anything else on stderr is skipped)."""
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                decoded = json.loads(line)
                if isinstance(decoded, dict):
                    lines.append(decoded)
        return lines

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == event]


@contextlib.contextmanager
def agent_process(config: Path, log: Path, *, umask: int = -1) -> Iterator[AgentProcess]:
    """Start `oak-agent run` (with `umask` when given); on exit stop it by PID (SIGTERM,
    then SIGKILL)."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "--log-format",
                "json",
                "run",
                "--config",
                str(config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            umask=umask,
        )
    try:
        yield AgentProcess(process, log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
