"""Installing on a controller: the wheel, a fresh venv with the pinned deps, the README's steps.

Slow-ish (a real install of every pinned dependency, ~20-30 s with pip, ~1 s from uv's cache)
and it needs the package index pip and uv are set up for. The README's steps run verbatim in
a private mount namespace over throw-away overlays of /etc, /opt and /var, so the machine's
own users and files are never touched; that part needs root, unshare and overlayfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from agent.topics import Topics
from tests.brokers import Broker, free_port
from tests.harness import CAM1, observe

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.harness import Observer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
_INSTALL_TIMEOUT = 300.0  # pip downloads every pinned wheel (depthai and numpy are the big ones)
_STOP_TIMEOUT = 20.0
_MOBILENET = {"type": "MobileNet"}
_WRITABLE_ROOTS = ("etc", "opt", "var")  # what the README's steps write to
# the interpreter under the test venv, which has pip (a uv-made venv has none)
_BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
# a root login shell's PATH on Debian: `python3` is the system's, as on a controller
_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _uv() -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    local = ROOT / ".tools" / "bin" / "uv"  # where scripts/bootstrap puts it
    return str(local) if local.exists() else None


def _env() -> dict[str, str]:
    """This environment without the test venv's own settings."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(command: list[str], *, cwd: Path | None = None) -> str:
    done = subprocess.run(
        command,
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=_INSTALL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from this checkout as the README says."""
    out = tmp_path_factory.mktemp("dist")
    uv = _uv()
    if uv is not None:
        _run([uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)])
    else:
        _run(
            [_BASE_PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(out), "."],
            cwd=ROOT,
        )
    (built,) = out.glob("oak_edge_agent-*.whl")
    return built


@dataclass(frozen=True, slots=True)
class Venv:
    prefix: Path

    @property
    def bin(self) -> Path:
        return self.prefix / "bin"


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv (no system site-packages) with runtime.txt, hash-checked, and the wheel."""
    venv = Venv(tmp_path_factory.mktemp("opt") / "oak-agent")
    lock = str(ROOT / "requirements" / "runtime.txt")
    uv = _uv()
    if uv is not None:  # the README's uv variant: the same lock and hashes, from uv's cache
        python = str(venv.bin / "python")
        _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv.prefix)])
        _run([uv, "pip", "install", "--python", python, "--require-hashes", "-r", lock])
        _run([uv, "pip", "install", "--python", python, "--no-deps", str(wheel)])
        _run([uv, "pip", "check", "--python", python])
    else:
        pip = str(venv.bin / "pip")
        _run([_BASE_PYTHON, "-m", "venv", str(venv.prefix)])
        _run([pip, "install", "--quiet", "--require-hashes", "-r", lock])
        _run([pip, "install", "--quiet", "--no-deps", str(wheel)])
        _run([pip, "check"])
    return venv


def test_wheel_holds_the_whole_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = whl.read(entry_points).decode()
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "agent").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources, "no sources found"
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    # the package and its metadata only: no config/, tests/ or data the agent would read
    outside = {n for n in names if not n.startswith("agent/") and ".dist-info/" not in n}
    assert not outside, outside
    assert re.search(r"^oak-agent = agent\.cli:main$", scripts, re.MULTILINE), scripts


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _help_works(venv: Venv, cwd: Path) -> None:
    done = subprocess.run(
        [str(venv.bin / "oak-agent"), "--help"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: oak-agent" in done.stdout


@contextlib.contextmanager
def _process(
    command: list[str], log: Path, *, cwd: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process with its output in `log`; stop it by PID on the way out."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd, env=env
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def _online(
    obs: Observer, topics: Topics, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Wait for the agent's retained `online`; fail at once, with its log, if it exits first."""

    async def _exits() -> None:
        code = await anyio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
        pytest.fail(f"exited with {code} before it was online:\n{_text(log)}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(_exits)
        await obs.wait_for(lambda: obs.latest(topics.availability) == b"online", timeout, "online")
        tg.cancel_scope.cancel()


async def _deploy(obs: Observer, topics: Topics, blob: bytes) -> None:
    """A deploy through the installed agent: depthai parses the blob, the simulator runs it."""
    info = await obs.wait_for(lambda: obs.latest_json(topics.info), what="retained info")
    assert info["backend"] == "simulator", info
    await obs.deploy(CAM1, "CAM_A", {"request_id": "inst", "nn_config": _MOBILENET, "model": blob})
    outcome = await obs.outcome("inst", timeout=30)
    assert outcome.state == "succeeded", outcome


async def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM by PID, as systemd stops it: a clean exit, no traceback."""
    os.kill(process.pid, signal.SIGTERM)
    returncode = await anyio.to_thread.run_sync(process.wait, _STOP_TIMEOUT)
    text = _text(log)
    assert returncode == 0, text
    assert "Traceback" not in text


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """The embedded broker listens once the agent has started it (bounded: 200 tries of <= 0.25 s)."""
    for _ in range(200):
        if process.poll() is not None:
            pytest.fail(f"agent exited with {process.returncode}:\n{_text(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    pytest.fail(f"no embedded broker on port {port}:\n{_text(log)}")


async def test_installed_agent_runs_from_its_venv(
    installed: Venv, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    # away from the checkout: nothing of the repository is importable or readable by path
    _help_works(installed, tmp_path)
    where = _run(
        [str(installed.bin / "python"), "-c", "import agent; print(agent.__file__)"], cwd=tmp_path
    )
    assert Path(where.strip()).is_relative_to(installed.prefix), where

    port = free_port()
    agent_id = f"inst-{os.getpid()}"
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[agent]
id = "{agent_id}"
state_dir = "state"

[mqtt]
host = "127.0.0.1"
port = {port}
prefix = "oaktest"

[broker]
embedded = true

[[simulator.cameras]]
mxid = "{CAM1}"
sensors = {{ CAM_A = "color" }}
boot_seconds = 0.2
fps = 5
"""
    )
    log = tmp_path / "agent.log"
    command = [
        str(installed.bin / "oak-agent"),
        "--log-format",
        "json",
        "run",
        "--config",
        str(config),
    ]
    with _process(command, log, cwd=tmp_path, env=_env()) as agent:
        _wait_listening(port, agent, log)
        embedded = Broker(kind="amqtt", host="127.0.0.1", port=port, pid=agent.pid)
        topics = Topics.for_agent("oaktest", agent_id)
        async with observe(embedded, topics) as obs:
            await _online(obs, topics, agent, log, 30)
            await _deploy(obs, topics, own_blobs["ssd_tiny"].read_bytes())
        await _stop(agent, log)  # its embedded broker goes with it: the observer left first
    sha = hashlib.sha256(own_blobs["ssd_tiny"].read_bytes()).hexdigest()
    assert (tmp_path / "state" / "models" / f"{sha}.blob").is_file()


def test_unit_passes_systemd_analyze_verify(installed: Venv, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "oak-agent.service").read_text()
    # the unit's binary must exist: point a copy at the venv installed above
    assert "ExecStart=/opt/oak-agent/bin/oak-agent " in unit
    here = unit.replace("ExecStart=/opt/oak-agent/bin/", f"ExecStart={installed.bin}/")

    def verify(text: str) -> str:
        path = tmp_path / "oak-agent.service"
        path.write_text(text)
        done = subprocess.run(
            [analyze, "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return f"exit {done.returncode}: {done.stdout}{done.stderr}".strip()

    assert verify(here) == "exit 0:"
    # systemd-analyze only warns (exit 0) about a key it does not know: the output is the check
    misspelt = verify(here.replace("ProtectClock=", "ProtectClok="))
    assert "Unknown key 'ProtectClok'" in misspelt, misspelt


def _readme_install_block() -> str:
    """The README's root install commands: the second sh block of "Running on a controller"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Running on a controller\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2, "the README's install commands moved"
    return str(blocks[1])


def _namespace_support(tmp_path: Path) -> str | None:
    """Why the README's steps cannot run here in a private root, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (useradd, chown, mount) inside a private mount namespace"
    for tool in ("unshare", "setpriv", "useradd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    python = shutil.which("python3", path=_ROOT_PATH)
    if python is None:
        return "no python3 on the system PATH"
    check = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"
    if subprocess.run(
        [python, "-c", check], capture_output=True, timeout=30, check=False
    ).returncode:
        return f"{python} is older than 3.11 or has no venv/ensurepip (python3-venv)"
    if any(tmp_path.resolve().is_relative_to(f"/{d}") for d in _WRITABLE_ROOTS):
        return f"the temp folder {tmp_path} lies under a folder the overlays cover"
    (tmp_path / "probe" / "upper").mkdir(parents=True)
    (tmp_path / "probe" / "work").mkdir()
    probe = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir=/opt,upperdir={tmp_path}/probe/upper,workdir={tmp_path}/probe/work",
            "/opt",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"no overlay mount in a private mount namespace: {probe.stderr.strip()}"
    return None


_PRIVATE_ROOT = r"""
set -euo pipefail
umask 022
for d in {roots}; do
    mkdir -p "$T/upper/$d" "$T/work/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/upper/$d,workdir=$T/work/$d" "/$d"
done
# no udev and no systemd run in here: record what the steps ask of them
udevadm() {{ echo "udevadm $*" >>"$T/calls"; }}
systemctl() {{ echo "systemctl $*" >>"$T/calls"; }}
if command -v systemd-analyze >/dev/null; then
    systemd-analyze() {{ command systemd-analyze "$@" 2>&1 | tee -a "$T/verify"; }}
else
    systemd-analyze() {{ echo "systemd-analyze $*" >>"$T/calls"; }}
fi
cd "$T/bundle"
source "$T/steps.sh"
echo "steps done" >&2
# what the operator edits, and what StateDirectory=oak-agent creates when the service starts
cat "$T/agent.toml" >/etc/oak-agent/agent.toml
install -d -m 0750 -o oak-agent -g oak-agent /var/lib/oak-agent
cd /
# the service's own user, groups and environment
exec setpriv --reuid=oak-agent --regid=oak-agent --init-groups \
    env -i PATH=/usr/bin:/bin HOME=/var/lib/oak-agent STATE_DIRECTORY=/var/lib/oak-agent \
    /opt/oak-agent/bin/oak-agent --log-format json run --config /etc/oak-agent/agent.toml
"""


def _ids(upper: Path, name: str) -> tuple[int, int, list[str]]:
    """uid, gid and supplementary groups of a user, from the overlay's own /etc."""
    passwd = (upper / "etc" / "passwd").read_text().splitlines()
    _, _, uid, gid, *_ = next(line for line in passwd if line.startswith(f"{name}:")).split(":")
    group = (upper / "etc" / "group").read_text().splitlines()
    groups = [g.split(":")[0] for g in group if name in g.split(":")[3].split(",")]
    return int(uid), int(gid), groups


@pytest.mark.timeout(_INSTALL_TIMEOUT + 60)
async def test_readme_install_steps_in_a_private_root(
    wheel: Path, broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    reason = _namespace_support(tmp_path)
    if reason is not None:
        pytest.skip(reason)
    bundle = tmp_path / "bundle"  # what the README says to copy to the controller
    (bundle / "dist").mkdir(parents=True)
    shutil.copy(wheel, bundle / "dist")
    for folder in ("requirements", "config", "systemd"):
        shutil.copytree(ROOT / folder, bundle / folder)
    (tmp_path / "steps.sh").write_text(_readme_install_block())
    agent_id = f"ctl-{os.getpid()}"
    (tmp_path / "agent.toml").write_text(
        f"""
[agent]
id = "{agent_id}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
prefix = "oaktest"
protocol = "{broker.protocol}"

[[simulator.cameras]]
mxid = "{CAM1}"
sensors = {{ CAM_A = "color" }}
boot_seconds = 0.2
fps = 5
"""
    )
    script = _PRIVATE_ROOT.format(roots=" ".join(_WRITABLE_ROOTS))
    log = tmp_path / "install.log"
    command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script]
    env = {**_env(), "PATH": _ROOT_PATH, "T": str(tmp_path), "TMPDIR": str(tmp_path)}
    topics = Topics.for_agent("oaktest", agent_id)
    async with observe(broker, topics) as obs:
        with _process(command, log, env=env, cwd=tmp_path) as agent:
            await _online(obs, topics, agent, log, _INSTALL_TIMEOUT)
            await _deploy(obs, topics, own_blobs["ssd_tiny"].read_bytes())
            await _stop(agent, log)
            await obs.wait_for(
                lambda: obs.latest(topics.availability) == b"offline", what="offline"
            )

    upper = tmp_path / "upper"
    uid, gid, groups = _ids(upper, "oak-agent")
    assert "plugdev" in groups
    config = (upper / "etc" / "oak-agent" / "agent.toml").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (0, gid, 0o640)
    etc = (upper / "etc" / "oak-agent").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o777) == (0, gid, 0o750)
    rules = upper / "etc" / "udev" / "rules.d" / "80-movidius.rules"
    assert rules.read_text() == (ROOT / "systemd" / "80-movidius.rules").read_text()
    assert (upper / "etc" / "systemd" / "system" / "oak-agent.service").exists()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[:2] == ["udevadm control --reload-rules", "udevadm trigger"], calls
    if shutil.which("systemd-analyze"):
        verify = tmp_path / "verify"
        assert not verify.exists() or verify.read_text() == "", verify.read_text()
    # the deployed model was stored by the service user in its state directory
    sha = hashlib.sha256(own_blobs["ssd_tiny"].read_bytes()).hexdigest()
    model = upper / "var" / "lib" / "oak-agent" / "models" / f"{sha}.blob"
    assert model.stat().st_uid == uid
