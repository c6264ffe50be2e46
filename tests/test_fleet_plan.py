"""The rollout's pure rules, and its record as read back from the broker (untrusted)."""

from __future__ import annotations

import io
import math

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from agent.errors import ErrorInfo
from agent.fleet.controller import FleetView
from agent.fleet.plan import (
    Options,
    Rollout,
    Selection,
    Spec,
    Target,
    abort_reason,
    decode_rollout,
    encode_rollout,
    next_wave,
    select_targets,
    wave_size,
)
from agent.fleet.progress import PlainLines, table
from agent.messages import Info, InfoCamera, MobileNetConfig
from agent.topics import FleetTopics
from tests.strategies import hostile_payloads

states = st.sampled_from(["pending", "sent", "succeeded", "failed", "rejected", "unknown"])


@given(st.binary(max_size=400) | hostile_payloads)
def test_any_retained_payload_decodes_or_is_none(payload: bytes) -> None:
    record = decode_rollout(payload)
    assert record is None or isinstance(record, Rollout)


def _rollout(target_states: list[str], **options: float) -> Rollout:
    return Rollout(
        id="r1",
        spec=Spec(
            action="deploy", stream="CAM_A", nn_config=MobileNetConfig(), model_sha256="a" * 64
        ),
        options=Options(**options),  # type: ignore[arg-type]
        targets=[
            Target(agent=f"a{i}", camera="C1", state=s)  # type: ignore[arg-type]
            for i, s in enumerate(target_states)
        ],
    )


@given(st.lists(states, max_size=30))
def test_the_record_round_trips(target_states: list[str]) -> None:
    rollout = _rollout(target_states)
    assert decode_rollout(encode_rollout(rollout)) == rollout


@given(st.integers(1, 500), st.integers(1, 50), st.floats(0.01, 100))
def test_wave_size(total: int, max_parallel: int, percent: float) -> None:
    size = wave_size(total, Options(max_parallel=max_parallel, batch_percent=percent))
    assert 1 <= size <= max_parallel
    assert size <= max(1, math.ceil(total * percent / 100))


@given(st.lists(states, max_size=30), st.floats(0, 100), st.integers(1, 10))
def test_abort_rule(target_states: list[str], percent: float, min_executed: int) -> None:
    rollout = _rollout(target_states, abort_percent=percent, min_executed=min_executed)
    executed = [s for s in target_states if s in {"succeeded", "failed", "rejected"}]
    failed = sum(s != "succeeded" for s in executed)
    reason = abort_reason(rollout)
    expected = (
        len(executed) >= min_executed and failed > 0 and failed * 100 > percent * len(executed)
    )
    assert (reason is not None) == expected
    if reason is not None:
        assert f"{failed} of {len(executed)}" in reason


def test_next_wave_takes_pending_in_order() -> None:
    rollout = _rollout(["succeeded", "pending", "pending", "pending"], max_parallel=2)
    assert [t.agent for t in next_wave(rollout)] == ["a1", "a2"]


def test_selection() -> None:
    def info(
        agent: str, groups: tuple[str, ...], *cameras: tuple[str, str, tuple[str, ...]]
    ) -> Info:
        return Info(
            agent_id=agent,
            version="x",
            depthai_version="x",
            backend="simulator",
            cameras=tuple(InfoCamera(mxid=m, name=n, streams=s) for m, n, s in cameras),
            started_at=0,
            groups=groups,
        )

    infos = {
        "a": info("a", ("site",), ("M1", "door", ("CAM_A",)), ("M2", "M2", ("CAM_B",))),
        "b": info("b", ("site", "lobby"), ("M1", "gate", ("CAM_A", "CAM_B"))),
        "c": info("c", ("lobby",), ("M3", "door", ("CAM_A",))),
        "off": info("off", ("site",), ("M9", "door", ("CAM_A",))),
    }
    online = {"a", "b", "c"}

    def chosen(selection: Selection, stream: str = "CAM_A") -> list[tuple[str, str]]:
        return [(t.agent, t.camera) for t in select_targets(infos, online, selection, stream)]

    assert chosen(Selection()) == [("a", "M1"), ("b", "M1"), ("c", "M3")]
    assert chosen(Selection(groups=("site",))) == [("a", "M1"), ("b", "M1")]
    assert chosen(Selection(groups=("lobby",), cameras=("door",))) == [("c", "M3")]
    assert chosen(Selection(agents=("a", "b")), "CAM_B") == [("a", "M2"), ("b", "M1")]
    assert chosen(Selection(cameras=("M1",))) == [("a", "M1"), ("b", "M1")]
    assert chosen(Selection(agents=("off",))) == []  # offline agents are left out
    # a camera without a name of its own is shown without one
    assert [t.name for t in select_targets(infos, online, Selection(agents=("a",)), "CAM_B")] == [
        ""
    ]
    assert msgspec.json.encode(Selection()) == b"{}"


def test_the_live_table_and_the_plain_lines_show_every_camera() -> None:
    rollout = _rollout(["succeeded", "failed", "pending"])
    rollout.targets[1].error = ErrorInfo("deploy_failed", "no boot")
    rollout.targets[1].wave = 1
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table(rollout))
    shown = console.export_text()
    assert "rollout r1: running; 3 cameras: 1 failed, 1 pending, 1 succeeded" in shown
    assert "deploy_failed: no boot" in shown
    assert shown.count("C1") == 3
    out = io.StringIO()
    lines = PlainLines(out)
    lines.update(rollout)
    lines.update(rollout)  # nothing changed: nothing more
    assert out.getvalue().splitlines() == [
        "a0/C1 succeeded",
        "wave 1: a1/C1 failed (deploy_failed: no boot)",
        "rollout r1: running; 3 cameras: 1 failed, 1 pending, 1 succeeded",
    ]


_VIEW_TOPICS = (
    "oak/a1/info",
    "oak/a1/availability",
    "oak/a1/events",
    "oak/a1/models",
    "oak/a1/cameras/C1/streams/CAM_A/nn/status",
    "oak/rollouts/r1",
    "oak/rollouts/r1/controller",
    "oak/rollouts/r1/sync",
    "oak/elsewhere",
    "other/a1/models",
)


@given(st.sampled_from(_VIEW_TOPICS), st.binary(max_size=400) | hostile_payloads)
def test_the_fleet_view_takes_any_payload(topic: str, payload: bytes) -> None:
    """What other clients retain is untrusted: anything that does not decode is skipped."""
    view = FleetView(FleetTopics("oak"))
    view.take(topic, payload)
    assert all(isinstance(sha, str) for shas in view.models.values() for sha in shas)


def test_the_fleet_view_reads_an_agents_model_list() -> None:
    view = FleetView(FleetTopics("oak"))
    entry = {"sha256": "b" * 64, "size": 10, "name": "m", "stored_at": 1.0, "last_used": 2.0}
    view.take("oak/a1/models", msgspec.json.encode([{**entry, "in_use_by": ["C1/CAM_A"]}]))
    assert view.stores("a1", "b" * 64)
    assert not view.stores("a1", "c" * 64)
    assert not view.stores("a2", "b" * 64)
    view.take("oak/a1/models", b"[]")  # it pruned the model
    assert not view.stores("a1", "b" * 64)
    view.take("oak/a1/models", b"not json")  # skipped: the last list stands
    assert view.models["a1"] == frozenset()
