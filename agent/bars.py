"""Progress for the client's transfers: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Final, TextIO

from agent.render import size as human_size

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["progress_bar"]

_STEP: Final = 10  # plain lines: one per this many percent


@contextlib.contextmanager
def progress_bar(
    label: str, *, stream: TextIO | None = None
) -> Iterator[Callable[[int, int | None], None]]:
    """A `progress(done, total)` function for one transfer, shown on `stream` (stderr)."""
    out = stream or sys.stderr
    if out.isatty():
        with _rich_bar(label, out) as update:
            yield update
        return
    last = [-1]

    def line(done: int, total: int | None) -> None:
        if total:
            step = min(100, done * 100 // total) // _STEP * _STEP
            if step == last[0]:
                return
            last[0] = step
            print(f"{label}: {step}% ({human_size(done)} of {human_size(total)})", file=out)
        elif done - last[0] >= 1024 * 1024 or last[0] < 0:
            last[0] = done
            print(f"{label}: {human_size(done)}", file=out)
        out.flush()

    yield line


@contextlib.contextmanager
def _rich_bar(label: str, out: TextIO) -> Iterator[Callable[[int, int | None], None]]:
    from rich.console import Console  # noqa: PLC0415  # only on a terminal
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(file=out)) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
