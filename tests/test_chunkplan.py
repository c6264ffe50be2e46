"""The sender's arithmetic: packet sizes, chunk sizes, chunks for missing ranges, manifests."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.chunkplan import (
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    chunk_length,
    chunk_size_for,
    chunks_to_send,
    has_range,
    manifest,
    missing_bytes,
    publish_packet_size,
)
from agent.client import decode_models
from agent.messages import ModelEntry, UploadManifest, UploadStatus, decode_manifest
from agent.sender import decode_status
from agent.topics import Topics
from tests.strategies import hostile_payloads

TOPICS = Topics.for_agent("oak", "demo")
SHA = "ab" * 32


def test_chunk_size_for_a_128k_broker() -> None:
    topic = TOPICS.chunk(SHA, 20_000_000)
    size = chunk_size_for(131072, topic, mqtt5=True)
    assert size == 126_976  # 31 x 4 KiB
    assert publish_packet_size(topic, size, mqtt5=True) <= 131072
    assert publish_packet_size(topic, size + MIN_CHUNK_SIZE, mqtt5=True) > 131072


def test_chunk_size_without_a_limit_and_with_a_small_one() -> None:
    topic = TOPICS.chunk(SHA, 0)
    assert chunk_size_for(None, topic, mqtt5=False) == DEFAULT_CHUNK_SIZE
    assert chunk_size_for(None, topic, mqtt5=False, limit=100_000) == 98_304
    with pytest.raises(ValueError, match="cannot carry a chunk of 4096 bytes"):
        chunk_size_for(4096, topic, mqtt5=False)


@given(
    max_packet=st.integers(min_value=4300, max_value=300_000_000),
    offset=st.integers(min_value=0, max_value=10**12),
    mqtt5=st.booleans(),
)
def test_a_chosen_chunk_always_fits(max_packet: int, offset: int, mqtt5: bool) -> None:
    topic = TOPICS.chunk(SHA, offset)
    size = chunk_size_for(max_packet, topic, mqtt5=mqtt5, limit=1 << 30)
    assert size % MIN_CHUNK_SIZE == 0
    assert size >= MIN_CHUNK_SIZE
    assert publish_packet_size(topic, size, mqtt5=mqtt5) <= max_packet


def test_chunks_for_missing_ranges() -> None:
    assert chunks_to_send(10_000, 4096, [(0, 10_000)]) == [0, 4096, 8192]
    assert chunks_to_send(10_000, 4096, [(4096, 8192)]) == [4096]
    assert chunks_to_send(10_000, 4096, [(4000, 4200), (9000, 10_000)]) == [0, 4096, 8192]
    assert chunks_to_send(10_000, 4096, []) == []
    assert chunks_to_send(10_000, 4096, [(5, 5), (20_000, 30_000), (-10, 1)]) == [0]
    assert chunk_length(8192, 10_000, 4096) == 1808
    assert chunk_length(0, 10_000, 4096) == 4096
    assert missing_bytes([(0, 10), (20, 25)]) == 15


@given(
    size=st.integers(min_value=1, max_value=10**7),
    chunk_size=st.integers(min_value=4096, max_value=1 << 20),
    data=st.data(),
)
def test_chunks_cover_exactly_the_missing_bytes(
    size: int, chunk_size: int, data: st.DataObject
) -> None:
    bounds = data.draw(st.lists(st.integers(min_value=0, max_value=size), max_size=20, unique=True))
    bounds.sort()
    missing = list(zip(bounds[::2], bounds[1::2], strict=False))
    offsets = chunks_to_send(size, chunk_size, missing)
    assert offsets == sorted(set(offsets))
    covered = [(o, o + chunk_length(o, size, chunk_size)) for o in offsets]
    for start, end in missing:  # every missing byte is in a chunk sent
        if start < end:
            assert any(o <= start < e for o, e in covered)
            assert any(o < end <= e for o, e in covered)
    for o, e in covered:  # and every chunk sent holds a missing byte
        assert o % chunk_size == 0
        assert 0 < e - o <= chunk_size
        assert any(start < e and o < end for start, end in missing)


def test_manifest_is_what_the_agent_decodes() -> None:
    raw = manifest(3_000_000, 126_976, request_id="r-1", model_name="yolo.blob", expires_at=2e9)
    assert decode_manifest(raw) == UploadManifest(
        size=3_000_000, chunk_size=126_976, request_id="r-1", model_name="yolo.blob", expires_at=2e9
    )
    assert msgspec.json.decode(manifest(5000, 4096)) == {"size": 5000, "chunk_size": 4096}
    with pytest.raises(ValueError, match="at least 4096"):
        manifest(5000, 100)
    with pytest.raises(ValueError, match="at least one byte"):
        manifest(0, 4096)


@given(st.binary(max_size=500) | hostile_payloads)
def test_anything_on_a_status_or_the_model_list_decodes_or_is_skipped(payload: bytes) -> None:
    status = decode_status(payload)
    assert status is None or isinstance(status, UploadStatus)
    models = decode_models(payload)
    assert models is None or all(isinstance(m, ModelEntry) for m in models)


def test_a_real_status_and_model_list_decode() -> None:
    status = decode_status(
        b'{"state":"receiving","size":10,"received":4,"missing":[[4,10]],"updated_at":1.5,'
        b'"later_field":1}'
    )
    assert status is not None
    assert status.missing == ((4, 10),)
    models = decode_models(
        b'[{"sha256":"ab","size":3,"name":null,"stored_at":1,"last_used":2,"in_use_by":["X/CAM_A"]}]'
    )
    assert models is not None
    assert models[0].in_use_by == ("X/CAM_A",)
    assert models[0].previous_for == ()  # from an agent before it was listed
    kept = decode_models(
        b'[{"sha256":"ab","size":3,"name":null,"stored_at":1,"last_used":2,"in_use_by":[],'
        b'"previous_for":["X/CAM_A"]}]'
    )
    assert kept is not None
    assert (kept[0].in_use_by, kept[0].previous_for) == ((), ("X/CAM_A",))


def test_has_range() -> None:
    missing = [(4096, 8192), (12288, 16384)]
    assert has_range(0, 4096, missing, truncated=False)
    assert not has_range(4096, 4096, missing, truncated=False)
    assert not has_range(0, 5000, missing, truncated=False)  # overlaps the first range
    assert has_range(8192, 4096, missing, truncated=False)
    assert has_range(16384, 4096, missing, truncated=False)  # after every listed range
    assert not has_range(16384, 4096, missing, truncated=True)  # beyond a truncated list
    assert has_range(8192, 4096, missing, truncated=True)  # between listed ranges: known
    assert has_range(0, 10, [], truncated=False)


@given(
    size=st.integers(min_value=1, max_value=10**6),
    chunk_size=st.integers(min_value=4096, max_value=1 << 16),
    data=st.data(),
)
def test_a_chunk_is_had_exactly_when_it_is_not_to_be_sent(
    size: int, chunk_size: int, data: st.DataObject
) -> None:
    bounds = sorted(data.draw(st.lists(st.integers(0, size), max_size=10, unique=True)))
    missing = list(zip(bounds[::2], bounds[1::2], strict=False))
    to_send = set(chunks_to_send(size, chunk_size, missing))
    for offset in range(0, size, chunk_size):
        length = chunk_length(offset, size, chunk_size)
        assert has_range(offset, length, missing, truncated=False) == (offset not in to_send)
