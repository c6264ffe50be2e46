"""A fleet on loopback: a central mosquitto, two site mosquittos bridged to it, three agents
with two simulated cameras each on the sites, and a controller.toml for the central broker.

    scripts/fleet-demo                       # runs until Ctrl-C; prints what to try
    scripts/fleet-demo fail AGENT MXID       # that camera's next boot fails (a forced failure)

Everything lives in `--state` (default .state/fleet-demo); every process started is stopped
by its PID on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import anyio

from agent.fleet.bridge import bridge_topics

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "oak"
CAMERAS = (("14442C10D13EABCE00", "door"), ("18443010C1E1D31200", "yard"))
# agent id -> (site, groups)
AGENTS = {
    "dock-1": ("site-b", ("site-b", "entrance")),
    "gate-1": ("site-a", ("site-a", "entrance")),
    "gate-2": ("site-a", ("site-a", "entrance")),
}
READY_SECONDS = 60.0


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if found is None:
        sys.exit("fleet-demo: mosquitto is not installed (apt-get install mosquitto)")
    return found


def _broker_config(path: Path, port: int, bridge_to: int | None, name: str) -> Path:
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "persistence false",
        "log_dest none",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    if bridge_to is not None:
        # the agents' topics go out; only commands, uploads and the simulator's knobs come in
        lines += [
            f"connection {name}",
            f"address 127.0.0.1:{bridge_to}",
            f"remote_clientid bridge-{name}",
            *bridge_topics(PREFIX),
            "cleansession false",
            "restart_timeout 1 5",
            "notifications false",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _agent_config(path: Path, agent_id: str, port: int, groups: tuple[str, ...]) -> Path:
    cameras = "".join(
        f'\n[[simulator.cameras]]\nmxid = "{mxid}"\nname = "{name}"\nboot_seconds = 1.0\nfps = 2\n'
        for mxid, name in CAMERAS
    )
    path.write_text(
        f'[agent]\nid = "{agent_id}"\nstate_dir = "{path.parent / agent_id}"\n'
        f"groups = {json.dumps(list(groups))}\n"
        f'\n[mqtt]\nport = {port}\nprefix = "{PREFIX}"\nreconnect_max = 5.0\n{cameras}'
    )
    return path


@contextlib.contextmanager
def _started(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink, cwd=ROOT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


async def _all_online(port: int, agents: list[str]) -> None:
    """Wait until the central broker has every agent's `online`: the bridges work."""
    seen: set[str] = set()
    with anyio.fail_after(READY_SECONDS):
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", port, identifier="fleet-demo") as client:
                    await client.subscribe(f"{PREFIX}/+/availability", qos=1)
                    async for message in client.messages:
                        agent_id = message.topic.value.split("/")[1]
                        if message.payload == b"online":
                            seen.add(agent_id)
                        if seen >= set(agents):
                            return
            except aiomqtt.MqttError:
                await anyio.sleep(0.5)  # the central broker is still starting


async def _fail(port: int, agent_id: str, mxid: str) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="fleet-demo-fail") as client:
        topic = f"{PREFIX}/{agent_id}/simulator/cameras/{mxid}/fail_next_boot"
        await client.publish(topic, b"", qos=1)


def _hints(state: Path) -> str:
    config = state / "controller.toml"
    blob = ROOT / "tests" / "data" / "blobs" / "ssd_tiny.blob"
    return f"""
fleet ready: central broker 127.0.0.1 ({config}), agents {", ".join(AGENTS)}

  # make one camera fail its next boot, then roll a model out to the `entrance` group
  scripts/fleet-demo fail dock-1 {CAMERAS[0][0]}
  .venv/bin/oak-agent fleet deploy --config {config} --group entrance --stream CAM_A \\
      --model {blob} --nn-config '{{"type": "MobileNet"}}' \\
      --max-parallel 2 --min-executed 2 --rollout-id demo-1 --report demo-1.json
  .venv/bin/oak-agent fleet status demo-1 --config {config}
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="fleet-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, default=ROOT / ".state" / "fleet-demo")
    parser.add_argument(
        "--ports",
        default="18830,18831,18832",
        help="central, site-a, site-b (default %(default)s)",
    )
    parser.add_argument("action", nargs="*", help="fail AGENT MXID")
    args = parser.parse_args()
    central, site_a, site_b = (int(p) for p in args.ports.split(","))
    if args.action:
        if len(args.action) != 3 or args.action[0] != "fail":
            parser.error("the only action is: fail AGENT MXID")
        anyio.run(_fail, central, args.action[1], args.action[2])
        return 0
    state: Path = args.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    (state / "controller.toml").write_text(f'[mqtt]\nport = {central}\nprefix = "{PREFIX}"\n')
    mosquitto = _mosquitto()
    sites = {"site-a": site_a, "site-b": site_b}
    with contextlib.ExitStack() as stack:
        confs = [
            ("central", central, None),
            ("site-a", site_a, central),
            ("site-b", site_b, central),
        ]
        for name, port, bridge_to in confs:
            conf = _broker_config(state / f"{name}.conf", port, bridge_to, name)
            stack.enter_context(_started([mosquitto, "-c", str(conf)], state / f"{name}.log"))
        for agent_id, (site, groups) in AGENTS.items():
            config = _agent_config(state / f"{agent_id}.toml", agent_id, sites[site], groups)
            command = [sys.executable, "-m", "agent.cli", "--log-format", "json", "run"]
            stack.enter_context(
                _started([*command, "--config", str(config)], state / f"{agent_id}.log")
            )
        anyio.run(_all_online, central, list(AGENTS))
        print(_hints(state), flush=True)
        # the children are started: block the signals here only, and wait for one
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        print("fleet-demo: stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
