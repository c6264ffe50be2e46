"""Arbitrary bytes on the command topics: every one is answered, none crashes the agent."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidPayload
from agent.messages import decode_delete, decode_deploy
from tests.harness import CAM1, agent_and_observer, make_config
from tests.strategies import hostile_payloads

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.app import App
    from agent.messages import Event
    from tests.brokers import Broker
    from tests.harness import Observer


@pytest.fixture(scope="module")
def live(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[object, App, Observer]]:
    """One agent for every example, running in a portal's event loop."""
    config = make_config(broker, tmp_path_factory.mktemp("fuzz"))
    with start_blocking_portal("asyncio") as portal, contextlib.ExitStack() as stack:
        app, observer = stack.enter_context(
            portal.wrap_async_context_manager(agent_and_observer(broker, config))
        )
        yield portal, app, observer


def _valid(action: str, payload: bytes) -> bool:
    try:
        (decode_deploy if action == "deploy" else decode_delete)(payload)
    except InvalidPayload:
        return False
    return True


@given(st.binary(max_size=200), st.sampled_from(["deploy", "delete"]))
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_arbitrary_payloads_are_answered(
    live: tuple[object, App, Observer], payload: bytes, action: str
) -> None:
    _answered(live, payload, action)


@given(hostile_payloads, st.sampled_from(["deploy", "delete"]))
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
def test_hostile_payloads_are_answered(
    live: tuple[object, App, Observer], payload: bytes, action: str
) -> None:
    """Deep nesting, invalid UTF-8 in strings, oversized lists and strings (issue 15)."""
    _answered(live, payload, action)


def _answered(live: tuple[object, App, Observer], payload: bytes, action: str) -> None:
    portal, app, obs = live
    topic = obs.topics.command(CAM1, "CAM_A", action)  # type: ignore[arg-type]

    def answers() -> list[Event]:
        return [e for e in obs.events() if e.terminal]

    before = len(answers())

    async def send_and_wait() -> None:
        await obs.send(topic, payload)
        await obs.wait_for(lambda: len(answers()) > before, what="an answer")

    portal.call(send_and_wait)  # type: ignore[attr-defined]
    answer = answers()[before]
    assert len(answers()) == before + 1
    if _valid(action, payload):  # an empty delete, or `{}`, is a valid delete of nothing
        assert answer.state in ("succeeded", "rejected")
    else:
        assert answer.state == "rejected"
        assert answer.error is not None
        assert answer.error.code == "invalid_payload"
    assert app.coordinator.workers[CAM1].restarts == 0
