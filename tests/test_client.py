"""`oak-agent deploy|delete|watch` as a new user runs them: subprocesses against a running agent.

Every broker-facing test runs twice: against the agent's embedded amqtt broker (what
`scripts/demo` starts, and what a new user meets first) and against mosquitto. amqtt sends
a connecting client every retained message that matches *any* client's subscription, so
the observer below (subscribed to `{base}/#`) makes each client command receive the agent's
retained `online`, info and status before its own subscription: the original crash.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import pytest

from tests.brokers import Broker, free_port
from tests.harness import CAM1, WAIT, Observer, observe

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

from agent.topics import Topics

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SSD = ROOT / "tests" / "data" / "blobs" / "ssd_tiny.blob"
PREFIX = "oakcli"
Kind = Literal["amqtt", "mosquitto"]


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    out: str
    err: str


@dataclass(frozen=True, slots=True)
class Target:
    """A running agent process and how a client reaches it."""

    broker: Broker
    agent_id: str
    config: Path
    topics: Topics

    @property
    def config_args(self) -> list[str]:
        return ["--config", str(self.config)]


async def oak(*args: str, timeout: float = WAIT) -> Result:
    """Run `python -m agent.cli ARGS` to its end (killed if it outlives `timeout`)."""
    with anyio.fail_after(timeout):
        done = await anyio.run_process(
            [sys.executable, "-m", "agent.cli", *args], check=False, cwd=ROOT
        )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def _agent_toml(path: Path, kind: Kind, host: str, port: int, agent_id: str) -> None:
    broker = "[broker]\nembedded = true\n" if kind == "amqtt" else ""
    path.write_text(
        f"""
[agent]
id = "{agent_id}"
state_dir = "{path.parent / "state"}"

[mqtt]
host = "{host}"
port = {port}
prefix = "{PREFIX}"
reconnect_min = 0.1
reconnect_max = 0.5

{broker}
[[simulator.cameras]]
mxid = "{CAM1}"
name = "front-door"
sensors = {{ CAM_A = "color", CAM_B = "mono", CAM_C = "mono" }}
stereo = [["CAM_B", "CAM_C"]]
boot_seconds = 1.0
fps = 5
"""
    )


async def _listening(port: int) -> None:
    with anyio.fail_after(WAIT):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return


@contextlib.asynccontextmanager
async def running_target(
    kind: Kind, session_broker: Broker, tmp_path: Path
) -> AsyncIterator[tuple[Target, Observer]]:
    """The agent as a subprocess (with its embedded broker for amqtt) and an observer on `{base}/#`."""
    if kind == "mosquitto" and session_broker.kind != "mosquitto":
        pytest.skip("mosquitto is not installed")
    agent_id = f"cli-{uuid.uuid4().hex[:8]}"
    port = free_port() if kind == "amqtt" else session_broker.port
    config = tmp_path / "agent.toml"
    _agent_toml(config, kind, "127.0.0.1", port, agent_id)
    log = (tmp_path / "agent.log").open("wb")
    process = await anyio.open_process(
        [sys.executable, "-m", "agent.cli", "--log-format", "json", "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    try:
        await _listening(port)
        broker = Broker(kind=kind, host="127.0.0.1", port=port, pid=process.pid)
        topics = Topics.for_agent(PREFIX, agent_id)
        async with observe(broker, topics) as observer:
            await observer.wait_for(
                lambda: observer.latest(topics.availability) == b"online", what="agent online"
            )
            await observer.wait_for(lambda: observer.latest(topics.camera_status(CAM1)))
            yield Target(broker, agent_id, config, topics), observer
    finally:
        with anyio.move_on_after(10, shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(8):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        log.close()


@pytest.fixture(params=["amqtt", "mosquitto"])
def kind(request: pytest.FixtureRequest) -> Kind:
    return request.param  # type: ignore[no-any-return]


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.err, result.err


async def test_deploy_on_a_broker_holding_retained_state(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, _):
        result = await oak(
            "deploy",
            *target.config_args,
            "--camera",
            CAM1,
            "--stream",
            "CAM_A",
            "--model",
            str(SSD),
            "--nn-config",
            '{"type": "MobileNet"}',
            "--request-id",
            "first",
        )
    _no_traceback(result)
    assert result.code == 0, result
    assert '"state":"succeeded"' in result.out.splitlines()[-1]
    assert all('"request_id":"first"' in line for line in result.out.splitlines())


__all__: list[str] = []
_ = os
