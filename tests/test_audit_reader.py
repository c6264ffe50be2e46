"""The audit line reader behind `oak-agent audit`: any bytes in the files, never a crash."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.audit import AuditLine
from agent.auditview import (
    COLUMNS,
    MAX_LINE,
    Unreadable,
    read_audit,
    render_plain,
    render_rich,
    row,
)
from agent.config import ConfigError, load_config
from agent.errors import ErrorInfo
from tests.strategies import deep_values

text = st.text(max_size=40)  # any code point: control characters, markup, escapes
maybe = st.none() | text

lines = st.builds(
    AuditLine,
    ts=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**40), 2**40),
    kind=st.sampled_from(["received", "outcome"]),
    topic=text,
    action=text,
    camera=text,
    stream=maybe,
    request_id=maybe,
    key_id=maybe,
    signed=st.none() | st.booleans(),
    payload_sha256=maybe,
    payload_bytes=st.none() | st.integers(0, 2**40),
    model_sha256=maybe,
    state=maybe,
    error=st.none() | st.builds(ErrorInfo, code=text, message=text),
    superseded_by=maybe,
    replayed_state=maybe,
)

_encoder = msgspec.json.Encoder()


def _read(data: bytes) -> list[AuditLine | Unreadable]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.jsonl"
        path.write_bytes(data)
        return list(read_audit([path]))


def _shown(entries: list[AuditLine | Unreadable]) -> None:
    """Every way the command shows rows works, and each row has every column."""
    for short in (False, True):
        rows = [row(entry, short=short) for entry in entries]
        assert all(len(r) == len(COLUMNS) for r in rows)
        assert all(cell.isprintable() for r in rows for cell in r)  # no terminal escapes
        plain = render_plain(rows)
        assert plain.count("\n") == len(rows) + 1
        out = io.StringIO()
        render_rich(rows, out, "title")
        assert out.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_read_as_lines_or_unreadable(data: bytes) -> None:
    entries = _read(data)
    assert all(isinstance(e, AuditLine | Unreadable) for e in entries)
    assert len(entries) <= data.count(b"\n") + 1
    _shown(entries)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            lines.map(lambda line: (line, _encoder.encode(line))),
            st.binary(max_size=200).map(lambda raw: (None, raw.replace(b"\n", b" "))),
            deep_values.map(lambda v: (None, msgspec.json.encode(v[0]))),
        ),
        max_size=12,
    )
)
def test_good_lines_survive_among_bad_ones(
    mixed: list[tuple[AuditLine | None, bytes]],
) -> None:
    entries = _read(b"\n".join(raw for _, raw in mixed) + b"\n")
    expected = [(line, raw) for line, raw in mixed if raw.strip()]  # blank lines are skipped
    assert len(entries) == len(expected)
    for (line, raw), entry in zip(expected, entries, strict=True):
        if line is not None:
            assert entry == line  # read back as written, in order
        else:
            assert isinstance(entry, Unreadable), raw
    _shown(entries)


def test_an_overlong_line_is_unreadable_and_reading_goes_on() -> None:
    good = _encoder.encode(
        AuditLine(ts=1.0, kind="received", topic="t", action="deploy", camera="C")
    )
    entries = _read(b"x" * (3 * MAX_LINE) + b"\n" + good + b"\n")
    assert isinstance(entries[0], Unreadable)
    assert "longer than" in entries[0].reason
    assert isinstance(entries[1], AuditLine)
    assert len(entries) == 2


def test_markup_and_escapes_are_shown_as_text() -> None:
    line = AuditLine(
        ts=1e300, kind="received", topic="t", action="[bold]x[/bold]", camera="\x1b[31mred"
    )
    cells = row(line)
    assert cells[0] == "1e+300"  # a time no calendar holds: the number
    assert cells[4] == "[bold]x[/bold]"
    assert cells[5] == "\\x1b[31mred"
    out = io.StringIO()
    render_rich([cells], out, "t", width=400)
    assert "[bold]x[/bold]" in out.getvalue()
    assert "\x1b" not in out.getvalue()


def test_security_config_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[security]\naudit_max_bytes = 100\n")
    with pytest.raises(ConfigError, match="audit_max_bytes"):
        load_config(path)
    path.write_text("[security]\naudit_max_byte = 2048\n")
    with pytest.raises(ConfigError, match="audit_max_byte"):
        load_config(path)
    path.write_text("[security]\naudit = false\naudit_max_bytes = 2048\n")
    security = load_config(path).security
    assert (security.audit, security.audit_max_bytes) == (False, 2048)
