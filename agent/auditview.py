"""`oak-agent audit`: the audit log's files read back, oldest first, as a table.

Reads files only (no broker). Any bytes in the files are shown, never crash it: a line
that is not an audit line is a row `unreadable` with its file, line number and why.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec

from agent.audit import AuditLine, audit_files
from agent.config import load_config
from agent.errors import clip
from agent.limits import json_problem

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "COLUMNS",
    "Unreadable",
    "add_audit_command",
    "decode_line",
    "read_audit",
    "render_plain",
    "render_rich",
    "row",
    "run_audit_command",
]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
MAX_LINE: Final = 64 * 1024  # the writer's lines are a few hundred bytes

COLUMNS: Final = (
    "time (UTC)",
    "kind",
    "state",
    "error",
    "action",
    "camera",
    "stream",
    "request_id",
    "signed",
    "bytes",
    "payload_sha256",
    "model_sha256",
)

_decoder: Final = msgspec.json.Decoder(AuditLine)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A line of an audit file that is not an audit line."""

    file: str
    number: int
    reason: str


def decode_line(raw: bytes, *, file: str = "", number: int = 0) -> AuditLine | Unreadable | None:
    """One line of an audit file (without its newline); None for a blank line."""
    if not raw.strip():
        return None
    if len(raw) > MAX_LINE:
        return Unreadable(file, number, f"longer than {MAX_LINE} bytes")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Unreadable(file, number, f"not UTF-8 at byte {exc.start}")
    problem = json_problem(raw)
    if problem is not None:
        return Unreadable(file, number, problem)
    try:
        return _decoder.decode(raw)
    except (msgspec.MsgspecError, RecursionError, ValueError) as exc:
        return Unreadable(file, number, clip(str(exc), 200))


def read_audit(paths: Iterable[Path]) -> Iterator[AuditLine | Unreadable]:
    """Every line of `paths` in order (missing files skipped); raise OSError when one that
    exists cannot be read."""
    for path in paths:
        try:
            stream = path.open("rb")
        except FileNotFoundError:
            continue
        with stream:
            number = 0
            while raw := stream.readline(MAX_LINE + 1):
                number += 1
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):  # the rest of an overlong line
                        raw = stream.readline(MAX_LINE)
                    yield Unreadable(path.name, number, f"longer than {MAX_LINE} bytes")
                    continue
                line = decode_line(raw.rstrip(b"\r\n"), file=path.name, number=number)
                if line is not None:
                    yield line


def _text(value: object) -> str:
    """Shown as is when printable; control characters escaped (untrusted input)."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _time(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def _signed(line: AuditLine) -> str:
    if line.signed is None:
        return "?"
    if not line.signed:
        return "no"
    return f"yes: {line.key_id}" if line.key_id else "yes"


def row(entry: AuditLine | Unreadable, *, short: bool = False) -> tuple[str, ...]:
    """The table row of one line; `short`: hashes cut to 12 characters (a terminal)."""
    if isinstance(entry, Unreadable):
        where = f"{entry.file}:{entry.number}: {entry.reason}"
        return (_text(""), "unreadable", "", _text(where), *("",) * (len(COLUMNS) - 4))

    def digest(value: str | None) -> str:
        text = _text(value)
        return text[:12] if short and len(text) > 12 else text  # a prefix

    state = entry.state or ""
    if entry.replayed_state:
        state = f"{state} ({entry.replayed_state})"
    if entry.superseded_by:
        state = f"{state} by {entry.superseded_by}"
    return (
        _time(entry.ts),
        _text(entry.kind),
        _text(state),
        _text(entry.error.code if entry.error else ""),
        _text(entry.action),
        _text(entry.camera),
        _text(entry.stream),
        _text(entry.request_id),
        _text(_signed(entry)),
        _text("" if entry.payload_bytes is None else entry.payload_bytes),
        digest(entry.payload_sha256),
        digest(entry.model_sha256),
    )


def render_plain(rows: list[tuple[str, ...]]) -> str:
    """Aligned columns, two spaces apart, with a header; empty cells shown as `-`."""
    table = [COLUMNS, *(tuple(cell or "-" for cell in r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_rich(
    rows: list[tuple[str, ...]], out: TextIO, title: str, *, width: int | None = None
) -> None:
    """A rich table, for a terminal; cells are plain text (never markup)."""
    from rich.console import Console  # noqa: PLC0415  # only on a terminal
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(title=title, title_justify="left")
    for name in COLUMNS:
        table.add_column(name, overflow="fold")
    for cells in rows:
        table.add_row(*(Text(cell) for cell in cells))  # Text: no markup in untrusted cells
    Console(file=out, width=width).print(table)


def _since(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {value!r}")
    return seconds


def add_audit_command(sub: Any) -> None:
    """Add `audit` to the `oak-agent` subcommands."""
    audit = sub.add_parser(
        "audit",
        help="print the agent's audit log (the commands it received and their outcomes)",
        description=(
            "Print the audit log in the agent's state folder (audit/audit.jsonl and its "
            "rotated files, oldest first) as a table. Reads the files only: the agent "
            "need not run."
        ),
        epilog="exit codes:\n  0    printed\n  2    bad arguments, config, or no readable log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("--config", type=Path, required=True, help="the agent's TOML config file")
    audit.add_argument(
        "--since", type=_since, metavar="SECONDS", help="only lines from the last SECONDS"
    )
    audit.add_argument("--request-id", metavar="ID", help="only lines of this request")


def run_audit_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the table; the exit code. Raises ConfigError for a bad config."""
    out = out or sys.stdout
    folder = load_config(args.config).state_path / "audit"
    paths = audit_files(folder)
    try:
        os.listdir(folder)  # a folder this user may not open would look empty
    except FileNotFoundError:
        pass
    except OSError as exc:
        print(f"oak-agent audit: cannot read {folder}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if not any(p.exists() for p in paths):
        missing = f"oak-agent audit: no audit log in {folder} ({paths[-1].name} is missing)"
        print(missing, file=sys.stderr)
        return EXIT_USAGE
    since = None if args.since is None else time.time() - args.since
    rows = []
    try:
        for entry in read_audit(paths):
            if isinstance(entry, AuditLine):
                if since is not None and not entry.ts >= since:
                    continue
                if args.request_id is not None and entry.request_id != args.request_id:
                    continue
            rows.append(row(entry, short=out.isatty()))
    except OSError as exc:
        print(f"oak-agent audit: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if out.isatty():
        render_rich(rows, out, f"{folder / paths[-1].name}: {len(rows)} lines")
    else:
        out.write(render_plain(rows))
    return EXIT_OK
