"""The optional Prometheus exposition (`[metrics] listen`): the real agent scraped over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ConfigError, MetricsSection, load_config, split_listen
from agent.metrics import respond
from tests.brokers import free_port
from tests.harness import CAM1, CAM2, WAIT, agent_and_observer, camera_spec, make_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.brokers import Broker

pytestmark = pytest.mark.anyio


async def http(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send a raw request to 127.0.0.1:`port`; the status line and the body."""
    with anyio.fail_after(WAIT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request)
            received = b""
            while True:
                try:
                    received += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = received.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_stats_are_scraped_with_camera_and_stream_labels(
    broker: Broker, tmp_path: Path, own_blobs: dict[str, Path]
) -> None:
    port = free_port()
    config = make_config(broker, tmp_path, cameras=(camera_spec(CAM1), camera_spec(CAM2)))
    config = msgspec.structs.replace(config, metrics=MetricsSection(listen=f"127.0.0.1:{port}"))
    async with agent_and_observer(broker, config) as (_, obs):
        body: dict[str, Any] = {
            "request_id": "m1",
            "nn_config": {"type": "MobileNet"},
            "model": own_blobs["ssd_tiny"].read_bytes(),
        }
        await obs.deploy(CAM1, "CAM_A", body)
        assert (await obs.outcome("m1")).state == "succeeded"
        await obs.wait_for(lambda: len(obs.detections(CAM1, "CAM_A")) >= 25, what="frames")

        status, text = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == b"HTTP/1.0 200 OK"
        found = samples(text.decode())
        assert found["oak_agent_commands_total", (("outcome", "succeeded"),)] == 1
        assert found["oak_agent_commands_total", (("outcome", "rejected"),)] == 0
        assert found["oak_agent_uptime_seconds", ()] > 0
        assert found["oak_agent_rss_bytes", ()] > 10 * 1024 * 1024
        assert found["oak_agent_messages_published_total", ()] > 0
        cam = (("camera", CAM1),)
        assert 35 <= found["oak_camera_temperature_celsius", (*cam, ("sensor", "average"))] <= 65
        ddr = (*cam, ("memory", "ddr"))
        assert (
            0
            < found["oak_camera_memory_used_bytes", ddr]
            < found["oak_camera_memory_total_bytes", ddr]
        )
        assert found["oak_stream_dropped_total", (*cam, ("stream", "CAM_A"))] == 0
        assert found["oak_stream_fps", (*cam, ("stream", "CAM_A"))] > 0
        # a camera running nothing: no device figures
        assert not any(
            dict(labels).get("camera") == CAM2 for name, labels in found if "temperature" in name
        )

        status, _ = await http(port, b"GET / HTTP/1.1\r\n\r\n")
        assert status == b"HTTP/1.0 404 Not Found"
        status, _ = await http(port, b"nonsense\r\n\r\n")
        assert status == b"HTTP/1.0 400 Bad Request"


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_request_head_gets_a_response(head: bytes) -> None:
    response = respond(head, lambda: b"# metrics\n")
    status = response.split(b"\r\n", 1)[0]
    assert status in {
        b"HTTP/1.0 200 OK",
        b"HTTP/1.0 400 Bad Request",
        b"HTTP/1.0 404 Not Found",
        b"HTTP/1.0 405 Method Not Allowed",
    }
    if status.endswith(b"200 OK"):
        assert head.split(b" ", 1)[0] in {b"GET", b"HEAD"}
    length = int(response.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    if not head.startswith(b"HEAD "):
        assert len(response.split(b"\r\n\r\n", 1)[1]) == length


def test_head_has_no_body_and_post_is_refused() -> None:
    head = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", lambda: b"x" * 10)
    assert head.endswith(b"Content-Length: 10\r\nConnection: close\r\n\r\n")
    post = respond(b"POST /metrics HTTP/1.1\r\n\r\n", lambda: b"")
    assert post.startswith(b"HTTP/1.0 405")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert split_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", ":9464", "host:", "host:0", "host:65536", "h:x"])
def test_bad_listen_addresses_are_config_errors(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_config(path)


def test_metrics_are_off_unless_the_section_is_there(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nid = "a"\n')
    assert load_config(path).metrics is None
    path.write_text("[metrics]\n")
    assert load_config(path).metrics == MetricsSection(listen="127.0.0.1:9464")
