"""The README's "Secure broker: a walkthrough", run as written: its shell blocks in order, in a
throw-away folder that has the repository's `.venv` and `tests` (the commands use `../.venv`
and `../tests`), on free ports instead of 8883 and 8884. The broker and the agent blocks run
in the background, as in their own terminals, and are stopped by their process group's id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.brokers import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    not (
        Path("/usr/sbin/mosquitto").exists()
        and shutil.which("openssl")
        and shutil.which("mosquitto_passwd")
    ),
    reason="the walkthrough needs /usr/sbin/mosquitto, mosquitto_passwd and openssl",
)


def _blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Secure broker: a walkthrough")
    end = readme.index("\n## ", start)
    return re.findall(r"```sh\n(.*?)```", readme[start:end], re.DOTALL)


def _run(block: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", block],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )


@contextlib.contextmanager
def _background(block: str, cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A block as if in its own terminal; on exit SIGTERM to its process group, by id."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["bash", "-c", block], cwd=cwd, stdout=sink, stderr=sink, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _until(
    condition: Callable[[], object], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"{what}: exited {process.returncode}\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {_TIMEOUT:g} s\n{log.read_text()[-3000:]}")


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _connected(log: Path) -> dict[str, object] | None:
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "mqtt connected":
                return entry
    return None


def test_the_secure_broker_walkthrough_as_written(tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) == 7, "the test follows the walkthrough's seven blocks"
    agents, operators = free_port(), free_port()
    blocks = [b.replace("8883", str(agents)).replace("8884", str(operators)) for b in blocks]
    site = tmp_path / "repo"
    site.mkdir()
    for name in (".venv", "tests"):
        (site / name).symlink_to(ROOT / name)
    certificates, broker_files, configs, broker, agent, deploys, audit = blocks

    for block in (certificates, broker_files, configs):
        done = _run(block, site)
        assert done.returncode == 0, f"{block}\n{done.stdout}{done.stderr}"
    secure = site / "secure"
    assert (secure / "keys" / "operator.key").stat().st_mode & 0o777 == 0o600
    assert "[[security.keys]]" in done.stdout  # keygen printed the snippet

    with _background(broker, site, tmp_path / "mosquitto.log") as mosquitto:
        log = tmp_path / "mosquitto.log"
        _until(lambda: _listening(agents) and _listening(operators), "mosquitto", mosquitto, log)
        with _background(agent, site, tmp_path / "agent.log") as running:
            log = tmp_path / "agent.log"
            _until(lambda: _connected(log), "the agent connected", running, log)
            connected = _connected(log)
            assert connected is not None
            assert connected["broker"] == f"127.0.0.1:{agents} (mutual TLS)"
            done = _run(deploys, site)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    signed, unsigned = events[:3], events[3:]
    assert [e["state"] for e in signed] == ["accepted", "applying", "succeeded"], done
    assert [(e["state"], e["error"]["code"]) for e in unsigned] == [("rejected", "unauthorized")]
    assert done.returncode == 1, done  # the unsigned deploy's exit code
    assert "rejected (unauthorized)" in done.stderr
    assert "Traceback" not in done.stderr
    shown = _run(audit, site)  # the agent has stopped: its log is complete
    assert shown.returncode == 0, shown
    rows = [re.split(r"\s{2,}", line.strip()) for line in shown.stdout.splitlines()]
    assert rows[0][:3] == ["time (UTC)", "kind", "state"]
    # kind, state, error, action, camera, stream, request_id, signed
    assert [r[1:4] + r[8:9] for r in rows[1:]] == [
        ["received", "submitted", "-", "yes: operator"],
        ["outcome", "succeeded", "-", "yes: operator"],
        ["received", "rejected", "unauthorized", "no"],
    ], shown.stdout
