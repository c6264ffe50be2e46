"""The depthai backend's discovery child: Ctrl-C and SIGTERM stop the agent and its child cleanly.

Runs the real `python -m agent.cli run` with the depthai backend (no device here: the agent
runs with no cameras, and its discovery child keeps scanning) as a process group of its own,
as a shell runs a foreground command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from agent.topics import Topics
from tests.harness import observe

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio

_EXIT_BOUND = 20.0  # the agent's own shutdown is bounded by a few seconds
_DISCOVER = b"agent.cameras.discover"


def _children(pid: int) -> list[int]:
    """The PIDs of a process's children, from /proc (every thread can have its own)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None


@contextlib.contextmanager
def _agent_group(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [
        pytest.param(signal.SIGINT, True, id="ctrl-c-to-the-process-group"),
        pytest.param(signal.SIGTERM, False, id="sigterm-to-the-agent"),
    ],
)
async def test_signal_stops_agent_and_discovery_child(
    broker: Broker, tmp_path: Path, signum: signal.Signals, to_group: bool
) -> None:
    agent_id = f"disc-{os.getpid()}-{signum.name.lower()}"
    config = tmp_path / "agent.toml"
    # no [simulator] section: the depthai backend, which runs discovery in a child process
    config.write_text(
        f"""
[agent]
id = "{agent_id}"
state_dir = "state"

[mqtt]
host = "{broker.host}"
port = {broker.port}
prefix = "oaktest"
protocol = "{broker.protocol}"

[depthai]
discovery_interval = 1.0
"""
    )
    log = tmp_path / "agent.log"
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(broker, topics) as obs:
        with _agent_group(config, log) as agent:
            await obs.wait_for(
                lambda: obs.latest(topics.availability) == b"online", what="agent online"
            )
            # the backend waits for the first scan before the agent goes online
            discovery = [c for c in _children(agent.pid) if _DISCOVER in (_cmdline(c) or b"")]
            assert len(discovery) == 1, f"discovery children of {agent.pid}: {discovery}"
            (child,) = discovery
            if to_group:
                os.killpg(agent.pid, signum)
            else:
                os.kill(agent.pid, signum)
            returncode = await anyio.to_thread.run_sync(agent.wait, _EXIT_BOUND)
            stderr = log.read_text(errors="replace")
            assert returncode == 0, stderr
            assert "Traceback" not in stderr
            assert "KeyboardInterrupt" not in stderr
            assert "discovery stopped" not in stderr  # stopped by the agent, not on its own
            # the agent reaped its child: the PID is gone (or, reused, runs something else)
            assert _DISCOVER not in (_cmdline(child) or b"")
            await obs.wait_for(
                lambda: obs.latest(topics.availability) == b"offline", what="agent offline"
            )
