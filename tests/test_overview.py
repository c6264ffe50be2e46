"""`oak-agent status` as a user runs it (a subprocess) against the agent on the embedded amqtt
broker and on mosquitto, and the overview's reading of retained payloads anyone can write.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import overview
from tests.harness import CAM1
from tests.test_client import PREFIX, SSD, Kind, kind, oak, running_target

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

__all__ = ["kind"]  # the fixture, shared with tests/test_client.py

pytestmark = pytest.mark.anyio

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _lines(out: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]


async def test_status_shows_the_agent_its_cameras_and_streams(
    kind: Kind, broker: Broker, tmp_path: Path
) -> None:
    async with running_target(kind, broker, tmp_path) as (target, _):
        deployed = await oak(
            "deploy", *target.config_args, "--camera", CAM1, "--stream", "CAM_A",
            "--model", str(SSD), "--nn-config", '{"type": "MobileNet"}',
            "--labels", "background,person", "--request-id", "st-1",
        )  # fmt: skip
        assert deployed.code == 0, deployed
        # another agent on the same broker, as retained topics in the shapes the agent uses
        other = f"other-{uuid.uuid4().hex[:6]}"
        base = f"{PREFIX}/{other}"
        planted: dict[str, str | bytes] = {
            f"{base}/availability": b"offline",
            f"{base}/info": json.dumps(
                {"version": "0.1.0", "cameras": [{"mxid": "AAA1", "name": "yard"}]}
            ),
            f"{base}/cameras/AAA1/status": json.dumps(
                {
                    "state": "online",
                    "name": "yard",
                    "last_error": {"code": "deploy_failed", "message": "x"},
                }
            ),
            f"{base}/cameras/AAA1/stats": json.dumps({"temperature": {"average": 41.26}}),
            f"{base}/cameras/AAA1/streams/CAM_A/nn/status": json.dumps(
                {"state": "running", "model": {"sha256": "ab" * 32, "size": 1}}
            ),
            f"{base}/cameras/AAA1/streams/CAM_A/nn/counts": json.dumps(
                {"total": 3, "by_label": {"person": 2, "car": 1}, "present": ["person", "car"]}
            ),
        }
        async with aiomqtt.Client(target.broker.host, target.broker.port) as client:
            for topic, payload in planted.items():
                await client.publish(topic, payload, qos=1, retain=True)
            everyone = await oak("status", "--config", str(target.config), "--format", "plain")
            mine = await oak("status", *target.flags, "--format", "json")
            nobody = await oak("status", *target.config_args, "--agent", "nobody-here")
            for topic in planted:
                await client.publish(topic, b"", qos=1, retain=True)
    assert everyone.code == 0, everyone
    lines = _lines(everyone.out)
    assert lines[0] == list(overview.COLUMNS)
    # other tests' agents may have left their retained state under the same prefix
    ours = [line for line in lines if line[0] == f"{target.agent_id} (online)"]
    assert [
        f"{target.agent_id} (online)", f"front-door ({CAM1})", "online", "CAM_A", "running",
        "ssd_tiny.blob",
    ] == ours[0][:6]  # fmt: skip
    assert [
        f"{other} (offline)", "yard (AAA1)", "online", "CAM_A", "running", "ab" * 6, "3",
        "person, car", "41.3 °C", "deploy_failed",
    ] in lines  # fmt: skip
    assert mine.code == 0, mine
    rows = json.loads(mine.out)
    assert {row["agent"] for row in rows} == {f"{target.agent_id} (online)"}
    assert rows[0]["stream"] == "CAM_A"
    assert nobody.code == 1
    assert "no agent 'nobody-here' found" in nobody.err


async def test_status_without_a_broker_says_so(tmp_path: Path) -> None:
    from tests.brokers import free_port  # noqa: PLC0415

    result = await oak("status", "--port", str(free_port()), "--timeout", "2")
    assert result.code == 4, result
    assert "cannot connect" in result.err or "refused" in result.err, result.err
    assert "Traceback" not in result.err


topics = st.builds(
    lambda agent, tail: f"{PREFIX}/{agent}/{tail}",
    st.text(min_size=1, max_size=8).filter(lambda s: "/" not in s),
    st.sampled_from([
        "availability", "info", "cameras/C1/availability", "cameras/C1/status",
        "cameras/C1/stats", "cameras/C1/streams/CAM_A/nn/status",
        "cameras/C1/streams/CAM_A/nn/counts", "cameras/C1/streams/x/y/z", "odd",
    ]),
)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "state": st.text(),
            "name": st.text(),
            "last_error": st.none() | st.fixed_dictionaries({"code": st.text()}),
        }
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"total": st.integers(), "present": st.lists(st.text(), max_size=3)}).map(
        lambda v: json.dumps(v).encode()
    ),
)


@settings(max_examples=300)
@given(st.dictionaries(topics, payloads, max_size=12))
def test_any_retained_payload_gives_a_table_without_control_characters(
    retained: dict[str, bytes],
) -> None:
    table = overview.rows(PREFIX, retained)
    text = overview.plain_table(table)
    assert not _CONTROL.search(text)
    assert len(text.splitlines()) == len(table) + 1
    assert json.loads(overview.to_json(table)) == [dict(zip(
        ("agent", "camera", "state", "stream", "nn", "model", "objects", "present",
         "temperature", "last_error"), row.cells(), strict=True)) for row in table]  # fmt: skip


def test_separators_and_bidi_overrides_are_cleaned_from_cells() -> None:
    # hypothesis found U+2028 in a camera name: str.splitlines() (and many viewers) break there
    assert overview._clean("front\u2028door\u202e\u2066x") == "front?door??x"
