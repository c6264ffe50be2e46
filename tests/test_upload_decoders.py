"""Property tests for the chunked upload's untrusted input: manifests, topics, the journal."""

from __future__ import annotations

import itertools
import re
import string
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, ModelsSection, load_config
from agent.errors import InvalidPayload
from agent.messages import MIN_CHUNK_SIZE, UploadManifest, decode_manifest
from agent.topics import Topics
from agent.uploads import Uploads, _read_journal, _record, _Upload
from tests.strategies import hostile_payloads

TOPICS = Topics.for_agent("oak", "agent-1")

scalars = st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8)
manifests = st.fixed_dictionaries(
    {},
    optional={
        "size": st.integers(-5, 2**41) | scalars,
        "chunk_size": st.integers(-5, 2**33) | scalars,
        "request_id": st.text(max_size=140) | scalars,
        "model_name": st.text(max_size=300) | scalars,
        "expires_at": st.floats() | scalars,
        "other": scalars,
    },
)


def _decoded(payload: bytes) -> UploadManifest | None:
    try:
        return decode_manifest(payload)
    except InvalidPayload as exc:
        error = exc
    assert error.path is not None
    assert error.path.startswith("$")
    return None


@given(st.binary(max_size=512))
@settings(max_examples=500)
def test_arbitrary_bytes_make_a_manifest_or_invalid_payload(payload: bytes) -> None:
    _decoded(payload)


@given(hostile_payloads)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_manifests_raise_only_invalid_payload(payload: bytes) -> None:
    _decoded(payload)


@given(manifests, st.sampled_from(["json", "msgpack"]))
@settings(max_examples=500)
def test_structured_manifests_decode_within_bounds_or_name_the_field(
    body: dict[str, Any], encoding: str
) -> None:
    encode = msgspec.msgpack.encode if encoding == "msgpack" else msgspec.json.encode
    try:
        payload = encode(body)
    except (TypeError, OverflowError, msgspec.EncodeError):
        assume(False)
        return
    manifest = _decoded(payload)
    if manifest is not None:
        assert isinstance(body["size"], int)
        assert manifest.size == body["size"] >= 1
        assert manifest.chunk_size == body["chunk_size"] >= MIN_CHUNK_SIZE


segments = st.text(alphabet=string.ascii_letters + string.digits + "-_+#/. é", max_size=80)


@given(segments, segments, st.sampled_from(["upload", "chunks", "status", "x"]))
@settings(max_examples=500)
def test_upload_topic_parsing_is_total(sha: str, offset: str, kind: str) -> None:
    tail = f"{sha}/{kind}" if kind != "chunks" else f"{sha}/chunks/{offset}"
    parsed = TOPICS.parse_upload(f"{TOPICS.base}/models/{tail}")
    if parsed is None:
        return
    assert parsed.sha256 == sha
    if parsed.problem is None:
        assert len(sha) == 64
        assert all(c in "0123456789abcdef" for c in sha)
        if parsed.kind == "chunk":
            assert parsed.offset is not None
            assert str(parsed.offset) == offset
        else:
            assert parsed.offset is None
    else:
        assert parsed.offset is None


@given(st.from_regex(r"[0-9a-f]{64}", fullmatch=True), st.integers(0, 10**15 - 1))
def test_chunk_topics_round_trip(sha: str, offset: int) -> None:
    parsed = TOPICS.parse_upload(TOPICS.chunk(sha, offset))
    assert parsed is not None
    assert (parsed.sha256, parsed.kind, parsed.offset, parsed.problem) == (
        sha,
        "chunk",
        offset,
        None,
    )
    assert TOPICS.parse(TOPICS.chunk(sha, offset)) is None  # never taken for a command


@given(st.lists(st.integers(0, 99), max_size=50), st.binary(max_size=40), st.integers(1, 100))
def test_the_journal_trusts_only_whole_valid_records(
    indices: list[int], tail: bytes, count: int
) -> None:
    raw = b"".join(_record(i) for i in indices) + tail
    read, valid = _read_journal(raw, count)
    # a prefix of what was written, up to the first index outside the upload
    expected = []
    for index in indices:
        if index >= count:
            break
        expected.append(index)
    assert read[: len(expected)] == expected
    assert valid % 8 == 0
    assert valid <= len(raw)
    # whatever follows the written records is read only if it is itself a valid record
    extra = read[len(expected) :]
    for n, index in enumerate(extra):
        start = (len(indices) + n) * 8
        packed = index.to_bytes(4, "little")
        assert raw[start : start + 8] == packed + zlib.crc32(packed).to_bytes(4, "little")


def test_a_zeroed_tail_is_not_a_record() -> None:
    raw = _record(3) + bytes(16)
    assert _read_journal(raw, 10) == ([3], 8)


def test_the_example_config_documents_every_models_key(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
    text = example.read_text()
    section = text[text.index("[models]") :].split("\n\n", 1)[0]
    uncommented = "\n".join(
        line[2:] if re.fullmatch(r"# [a-z_]+ = .*", line) else line for line in section.splitlines()
    )
    path = tmp_path / "agent.toml"
    path.write_text(uncommented + "\n")
    config = load_config(path)
    documented = set(re.findall(r"^([a-z_]+) =", uncommented, re.MULTILINE))
    assert documented == {f.name for f in msgspec.structs.fields(ModelsSection)}
    assert config.models == ModelsSection()  # the example shows the defaults
    readme = (example.parent.parent / "README.md").read_text()
    assert all(f"`models.{key}`" in readme for key in documented)


def test_keep_unreferenced_is_at_least_a_second(tmp_path: Path) -> None:
    """Shorter, a model that comes with its deploy could be pruned before the deploy
    refers to it (the store is pruned as soon as a model is added)."""
    path = tmp_path / "agent.toml"
    for bad in ("0", "0.5", "-1", '"5"'):
        path.write_text(f"[models]\nkeep_unreferenced = {bad}\n")
        with pytest.raises(ConfigError, match=r"models\.keep_unreferenced"):
            load_config(path)
    path.write_text("[models]\nkeep_unreferenced = 1\n")
    assert load_config(path).models.keep_unreferenced == 1.0


@given(
    st.integers(1, 10**7),
    st.integers(MIN_CHUNK_SIZE, 10**6),
    st.integers(0, 2 * 10**7),
    st.integers(0, 2 * 10**6),
)
@settings(max_examples=500)
def test_a_chunk_is_taken_only_where_the_manifest_puts_one(
    size: int, chunk_size: int, offset: int, length: int
) -> None:
    manifest = UploadManifest(size=size, chunk_size=chunk_size)
    upload = _Upload("0" * 64, manifest, Path(), bytearray(-(-size // chunk_size)), 0.0)
    problem = Uploads._chunk_problem(upload, offset, length)
    valid = offset < size and offset % chunk_size == 0 and length == min(chunk_size, size - offset)
    assert (problem is None) == valid, problem


@given(st.integers(1, 300_000), st.integers(MIN_CHUNK_SIZE, 20_000), st.randoms())
@settings(max_examples=300)
def test_missing_ranges_are_exactly_the_chunks_not_received(
    size: int, chunk_size: int, rng: Any
) -> None:
    count = -(-size // chunk_size)
    have = bytearray(rng.choice((0, 1)) for _ in range(count))
    upload = _Upload("0" * 64, UploadManifest(size=size, chunk_size=chunk_size), Path(), have, 0.0)
    ranges, truncated = upload.missing()
    wanted = [
        (i * chunk_size, min((i + 1) * chunk_size, size)) for i in range(count) if not have[i]
    ]
    covered = [
        (o, min(o + chunk_size, size))
        for start, end in ranges
        for o in range(start, end, chunk_size)
    ]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))  # apart, sorted
    assert all(start % chunk_size == 0 and start < end <= size for start, end in ranges)
    if truncated:
        assert len(ranges) == 64
        assert covered == wanted[: len(covered)]
    else:
        assert covered == wanted
