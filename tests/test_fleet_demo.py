"""The README's fleet demo as a new user runs it: scripts/fleet-demo, a forced failure, one
`oak-agent fleet deploy` that aborts and rolls back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.brokers import free_port, mosquitto_path

if TYPE_CHECKING:
    from tests.brokers import Broker

ROOT = Path(__file__).resolve().parent.parent
BLOB = ROOT / "tests" / "data" / "blobs" / "ssd_tiny.blob"
DEMO = ROOT / "scripts" / "fleet-demo"


def _read_until(process: subprocess.Popen[str], marker: str) -> str:
    """Lines of the demo's output up to the one starting with `marker` (bounded by the
    demo's own readiness timeout: it exits when the fleet is not ready)."""
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if line.startswith(marker):
            return "".join(seen)
    raise AssertionError(f"demo ended before {marker!r}: {''.join(seen)}")


@pytest.mark.skipif(mosquitto_path() is None, reason="the fleet demo needs mosquitto")
def test_fleet_demo_forced_failure_aborts_and_rolls_back(tmp_path: Path, broker: Broker) -> None:
    del broker  # only to share the suite's broker selection; the demo runs its own three
    ports = ",".join(str(free_port()) for _ in range(3))
    state = tmp_path / "demo"
    with subprocess.Popen(
        [str(DEMO), "--state", str(state), "--ports", ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as demo:
        try:
            _try_it(demo, state, ports, tmp_path)
        finally:
            demo.send_signal(signal.SIGTERM)
            try:
                assert demo.wait(timeout=30) == 0
            finally:
                if demo.poll() is None:
                    demo.kill()
                    demo.wait(timeout=5)
    # every agent it started was stopped cleanly (SIGTERM, not killed)
    for agent_id in ("dock-1", "gate-1", "gate-2"):
        assert '"shutting down"' in (state / f"{agent_id}.log").read_text()


def _try_it(demo: subprocess.Popen[str], state: Path, ports: str, tmp_path: Path) -> None:
    _read_until(demo, "fleet ready")
    hints = _read_until(demo, "  .venv/bin/oak-agent fleet status")
    assert "scripts/fleet-demo fail dock-1 14442C10D13EABCE00" in hints
    config = state / "controller.toml"
    # the commands the demo prints, as a user types them (the ports are this test's)
    fail = subprocess.run(
        [str(DEMO), "--ports", ports, "fail", "dock-1", "14442C10D13EABCE00"],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert fail.returncode == 0, fail.stderr
    report = tmp_path / "demo-1.json"
    deploy = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "fleet",
            "deploy",
            "--config",
            str(config),
            "--group",
            "entrance",
            "--stream",
            "CAM_A",
            "--model",
            str(BLOB),
            "--nn-config",
            '{"type": "MobileNet"}',
            "--max-parallel",
            "2",
            "--min-executed",
            "2",
            "--rollout-id",
            "demo-1",
            "--report",
            str(report),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deploy.returncode == 1, deploy.stderr
    assert "dock-1/14442C10D13EABCE00 (door) failed (deploy_failed" in deploy.stdout
    assert "dock-1/18443010C1E1D31200 (yard) rolled_back" in deploy.stdout
    assert "rollout demo-1: aborted" in deploy.stdout
    document = json.loads(report.read_text())
    assert document["counts"] == {"failed": 1, "pending": 4, "rolled_back": 1}
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "fleet",
            "status",
            "demo-1",
            "--config",
            str(config),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "rollout demo-1: aborted" in status.stdout
