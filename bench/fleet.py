"""Fleet rollouts at scale: N agents behind two bridged site brokers, `oak-agent fleet deploy`.

    .venv/bin/python -m bench.fleet [--agents 20] [--cameras 2] [--boot-seconds 1.0]
                                    [--parallel 1,5,40] [--fail-percent 30]
                                    [--model-bytes 5000000] [--site-cap 262144]

A central mosquitto and two site mosquittos bridged to it (the README's bridge lines); half
the agents on each site, each with `--cameras` simulated cameras booting in
`--boot-seconds`. The controller (a subprocess, as a user runs it) talks to the central
broker and rolls a MobileNet out to every camera at each `--parallel`; each run changes the
confidence threshold, so every camera restarts. Baseline: the ideal time, waves x boot time.
The first run also uploads the blob (in chunks) to every agent, which stores none yet.

Model delivery: at the largest `--parallel`, a `--model-bytes` model (the blob padded with
random bytes) that no agent stores, so the controller uploads it in chunks to every agent
across the bridges; baseline: the same rollout again, now that every agent stores it. The
site brokers are capped at `--site-cap` bytes (`max_packet_size`; 0: uncapped) and the
controller, on the uncapped central broker, is told with `--max-packet`.
Then one run at the last-but-one `--parallel` with `--fail-percent` of the cameras forced to
fail their next boot: how many failed, were rolled back, were never sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiomqtt
import anyio

from agent.chunkplan import DEFAULT_CHUNK_SIZE, chunk_size_for
from agent.topics import Topics
from bench._common import (
    BLOBS,
    PREFIX,
    BenchError,
    Process,
    Row,
    Table,
    agent_argv,
    bytecode_env,
    cli,
    median,
    mxids,
    run_async,
    spawned,
)
from tests.bridge import bridge_settings
from tests.brokers import BrokerUnavailable, run_broker
from tests.uploader import padded_model

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Options", "measure"]

_ONLINE_SECONDS: Final = 180.0  # every agent online, on a loaded 2-core machine
_GROUP: Final = "bench-fleet"


@dataclass(frozen=True, slots=True)
class Options:
    agents: int = 20
    cameras: int = 2
    boot_seconds: float = 1.0
    parallel: tuple[int, ...] = (1, 5, 40)
    fail_percent: int = 30
    model_bytes: int = 5_000_000  # the delivery runs' model
    site_cap: int = 262_144  # the site brokers' max_packet_size; 0: uncapped


@dataclass(frozen=True, slots=True)
class _Run:
    rollout_id: str
    parallel: int
    seconds: float
    cpu: float  # the controller's user + system seconds
    counts: dict[str, int]
    state: str
    uploaded: int  # agents the controller uploaded the model to


@dataclass(frozen=True, slots=True)
class _Deploy:
    """What one `fleet deploy` run sends: its model, threshold and parallelism."""

    model: Path
    parallel: int
    confidence: float
    max_packet: int  # 0: none given
    abort: bool = False


def _agent_config(root: Path, agent_id: str, port: int, options: Options) -> Path:
    folder = root / agent_id
    folder.mkdir()
    lines = [
        "[agent]",
        f'id = "{agent_id}"',
        f'state_dir = "{folder / "state"}"',
        f'groups = ["{_GROUP}"]',
        "",
        "[mqtt]",
        f"port = {port}",
        f'prefix = "{PREFIX}"',
        "reconnect_min = 0.2",
        "reconnect_max = 2.0",
    ]
    for mxid in mxids(options.cameras):
        lines += [
            "",
            "[[simulator.cameras]]",
            f'mxid = "{mxid}"',
            'sensors = { CAM_A = "color" }',
            f"boot_seconds = {options.boot_seconds}",
            "fps = 1",
        ]
    path = folder / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _all_online(port: int, agents: list[str]) -> None:
    seen: set[str] = set()
    with anyio.fail_after(_ONLINE_SECONDS):
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-fleet-watch") as client:
            await client.subscribe(f"{PREFIX}/+/availability", qos=1)
            async for message in client.messages:
                agent_id = message.topic.value.split("/")[1]
                if message.payload == b"online" and agent_id in agents:
                    seen.add(agent_id)
                if len(seen) == len(agents):
                    return
    raise BenchError("the central broker's subscription ended")  # pragma: no cover


async def _fail_next_boot(port: int, cameras: list[tuple[str, str]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-fleet-fail") as client:
        for agent_id, mxid in cameras:
            topic = f"{PREFIX}/{agent_id}/simulator/cameras/{mxid}/fail_next_boot"
            await client.publish(topic, b"", qos=1)


def _rollout(root: Path, controller: Path, deploy: _Deploy, tag: str = "") -> _Run:
    rollout_id = f"bench{tag}-{deploy.parallel}-{int(deploy.confidence * 1000)}"
    report = root / f"{rollout_id}.json"
    nn_config = {"type": "MobileNet", "nn_config": {"confidence_threshold": deploy.confidence}}
    argv = [
        sys.executable,
        "-m",
        "agent.cli",
        "fleet",
        "deploy",
        "--config",
        str(controller),
        "--group",
        _GROUP,
        "--stream",
        "CAM_A",
        "--model",
        str(deploy.model),
        "--nn-config",
        json.dumps(nn_config),
        "--max-parallel",
        str(deploy.parallel),
        "--rollout-id",
        rollout_id,
        "--report",
        str(report),
        "--timeout",
        "120",
    ]
    if deploy.max_packet:
        argv += ["--max-packet", str(deploy.max_packet)]
    if deploy.abort:
        argv += ["--abort-percent", "20", "--min-executed", str(deploy.parallel)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=bytecode_env(), timeout=1800
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not report.exists():
        raise BenchError(f"the controller wrote no report (exit {done.returncode}):\n{done.stderr}")
    document = json.loads(report.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rollout = document["rollout"]
    return _Run(
        rollout_id,
        deploy.parallel,
        seconds,
        cpu,
        document["counts"],
        rollout["state"],
        len(rollout["uploaded"]),
    )


def _status_seconds(controller: Path, run: _Run) -> float:
    """The controller's fixed cost: `fleet status` (start, connect, read the record, exit)."""
    argv = [sys.executable, "-m", "agent.cli", "fleet", "status", run.rollout_id]
    started = time.perf_counter()
    done = subprocess.run(
        [*argv, "--config", str(controller)],
        capture_output=True,
        check=False,
        env=bytecode_env(),
        timeout=120,
    )
    if done.returncode != 0:
        raise BenchError(f"fleet status failed: {done.stderr.decode()[-500:]}")
    return time.perf_counter() - started


def _chosen(agents: list[str], cameras: list[str], percent: int) -> list[tuple[str, str]]:
    """`percent` % of every (agent, camera), spread evenly over the rollout's order."""
    every = [(a, c) for a in sorted(agents) for c in cameras]
    count = round(len(every) * percent / 100)
    if not count:
        return []
    step = len(every) / count
    return [every[math.floor(i * step)] for i in range(count)]


def measure(options: Options) -> Table:
    if options.agents < 2:
        raise BenchError("--agents: at least 2 (one per site)")
    if options.site_cap < 0 or options.model_bytes < 1:
        raise BenchError("--site-cap: 0 or more; --model-bytes: at least 1")
    cameras = mxids(options.cameras)
    cap = (f"max_packet_size {options.site_cap}",) if options.site_cap else ()
    with tempfile.TemporaryDirectory(prefix="oak-bench-fleet-") as tmp:
        root = Path(tmp)
        try:
            with (
                run_broker("mosquitto", root / "central") as central,
                run_broker(
                    "mosquitto",
                    root / "site-a",
                    settings=(*cap, *bridge_settings("a", central.port, PREFIX)),
                ) as site_a,
                run_broker(
                    "mosquitto",
                    root / "site-b",
                    settings=(*cap, *bridge_settings("b", central.port, PREFIX)),
                ) as site_b,
            ):
                return _measure(root, central.port, (site_a.port, site_b.port), cameras, options)
        except BrokerUnavailable as exc:
            raise BenchError(f"cannot start mosquitto: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Delivery:
    upload: _Run  # no agent stores the model
    stored: _Run  # every agent does (the baseline)
    size: int
    chunk_size: int
    rss: list[int]  # agents' VmRSS KiB after both


def _measure(
    root: Path, central: int, sites: tuple[int, int], cameras: list[str], options: Options
) -> Table:
    controller = root / "controller.toml"
    controller.write_text(f'[mqtt]\nport = {central}\nprefix = "{PREFIX}"\n')
    agents = [f"agent-{n:02d}" for n in range(options.agents)]
    ssd = BLOBS / "ssd_tiny.blob"
    big = root / "padded.blob"
    big.write_bytes(padded_model(ssd, options.model_bytes))
    cap = options.site_cap
    processes: list[Process] = []
    with _agents(root, agents, sites, options, processes):
        started = time.perf_counter()
        run_async(lambda: _all_online(central, agents))
        ready = time.perf_counter() - started
        runs = [
            _rollout(root, controller, _Deploy(ssd, parallel, 0.5 + 0.01 * n, cap))
            for n, parallel in enumerate(options.parallel)
        ]
        rss = [p.kib("VmRSS") for p in processes]
        widest = max(options.parallel)
        upload = _rollout(root, controller, _Deploy(big, widest, 0.6, cap), "-big")
        stored = _rollout(root, controller, _Deploy(big, widest, 0.61, cap), "-big")
        delivery = _Delivery(
            upload,
            stored,
            big.stat().st_size,
            _chunk_size(big, agents[0], cap),
            [p.kib("VmRSS") for p in processes],
        )
        failing = _chosen(agents, cameras, options.fail_percent)
        run_async(lambda: _fail_next_boot(central, failing))
        parallel = options.parallel[-2] if len(options.parallel) > 1 else options.parallel[0]
        failed = _rollout(root, controller, _Deploy(ssd, parallel, 0.4, cap, abort=True))
        fixed = _status_seconds(controller, runs[-1])
    total = options.agents * options.cameras
    rows = []
    for run in runs:
        waves = math.ceil(total / run.parallel)
        ideal = waves * options.boot_seconds
        uploads = f", {run.uploaded} uploads" if run.uploaded else ""
        rows.append(
            Row(
                f"{total} cameras, --max-parallel {run.parallel} ({waves} waves)",
                f"{run.seconds:.1f} s, controller CPU {run.cpu:.2f} s{uploads}",
                f"ideal {ideal:.1f} s",
                f"{run.seconds / ideal:.2f}x",
            )
        )
        rows += _ended(run)
    rows.append(
        Row(
            "controller fixed cost: `fleet status` (start, connect, read, exit)",
            f"{fixed:.2f} s",
        )
    )
    rows.append(
        Row(
            "agent RSS (VmRSS) after the rollouts",
            f"median {median(rss) / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB",
            f"{options.agents} agents",
        )
    )
    rows += _delivery_rows(delivery, total, options)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(failed.counts.items()))
    rows.append(
        Row(
            f"{options.fail_percent} % forced failures ({len(failing)} cameras), "
            f"--max-parallel {failed.parallel}",
            f"{failed.state} after {failed.seconds:.1f} s: {counts}",
            "abort at > 20 %",
        )
    )
    capped = f"capped at max_packet_size {cap}" if cap else "uncapped"
    notes = [
        f"{options.agents} agent processes x {options.cameras} simulated cameras "
        f"(boot {options.boot_seconds:g} s), half on each of two site mosquittos ({capped}) "
        f"bridged to a central one; all online on the central broker {ready:.1f} s after the "
        "first spawn",
        "time: the controller subprocess from spawn to exit (start-up, discovery, waves, "
        "report); ideal: waves x boot time; controller CPU: its user + system seconds; "
        "uploads: agents the controller uploaded the model to (the report's rollout.uploaded)",
        f"the {ssd.stat().st_size:,} B SSD blob is uploaded to each agent in the first run; "
        "later runs find it in every agent's retained model list",
        "the padded model's rollout: the controller uploads it to every agent, each on a "
        "connection of its own, central broker -> bridge -> site broker -> agent, in chunks "
        "sized for the site cap (--max-packet); baseline: the same rollout once every agent "
        "stores it",
        "the forced-failure run aborts once its first wave's failures pass 20 %; "
        "the cameras it changed are rolled back, the rest never sent (pending)",
    ]
    return Table("fleet rollouts through bridged brokers", rows, notes)


def _chunk_size(model: Path, agent_id: str, cap: int) -> int:
    """The controller's chunk size for `model` (agent.fleet.delivery: MQTT 5, the longest
    chunk topic, `--max-packet` when the site brokers are capped)."""
    sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
    size = model.stat().st_size
    topic = Topics.for_agent(PREFIX, agent_id).chunk(sha256, size)
    return chunk_size_for(cap or None, topic, mqtt5=True, limit=DEFAULT_CHUNK_SIZE)


def _ended(run: _Run) -> list[Row]:
    return (
        [] if run.state == "succeeded" else [Row(f"  ^ ended {run.state}", json.dumps(run.counts))]
    )


def _delivery_rows(delivery: _Delivery, total: int, options: Options) -> list[Row]:
    upload, stored = delivery.upload, delivery.stored
    chunks = math.ceil(delivery.size / delivery.chunk_size)
    sent = upload.uploaded * delivery.size
    cost = upload.seconds - stored.seconds
    rows = [
        Row(
            f"{total} cameras, a {delivery.size / 1e6:.1f} MB model no agent stores, "
            f"--max-parallel {upload.parallel}",
            f"{upload.seconds:.1f} s, controller CPU {upload.cpu:.2f} s, "
            f"{upload.uploaded} uploads x {chunks} chunks of {delivery.chunk_size:,} B",
            f"every agent stores it: {stored.seconds:.1f} s, CPU {stored.cpu:.2f} s, "
            f"{stored.uploaded} uploads",
            f"{upload.seconds / stored.seconds:.2f}x",
        ),
        *_ended(upload),
        *_ended(stored),
    ]
    if upload.uploaded:
        rows.append(
            Row(
                "  delivery cost (the difference)",
                f"{cost:.1f} s for {sent / 1e6:.0f} MB = {sent / 1e6 / cost:.1f} MB/s, "
                f"{cost / upload.uploaded * 1000:.0f} ms per agent, all at once"
                if cost > 0
                else f"{cost:.1f} s (within the noise)",
            )
        )
    rss = delivery.rss
    rows.append(
        Row(
            "agent RSS (VmRSS) after the uploads",
            f"median {median(rss) / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB",
            f"{options.agents} agents",
        )
    )
    return rows


@contextlib.contextmanager
def _agents(
    root: Path,
    agents: list[str],
    sites: tuple[int, int],
    options: Options,
    processes: list[Process],
) -> Iterator[None]:
    """Spawn the agents (alternating sites); stop them all (by PID) on exit."""
    with contextlib.ExitStack() as stack:
        for n, agent_id in enumerate(agents):
            config = _agent_config(root, agent_id, sites[n % 2], options)
            log = config.parent / "agent.log"
            processes.append(stack.enter_context(spawned(agent_argv(config), log)))
        yield


if __name__ == "__main__":
    sys.exit(cli("fleet", measure, Options, __doc__))
