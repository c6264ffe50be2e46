"""How a rollout is shown while it runs: a rich live table on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.fleet.plan import counts

if TYPE_CHECKING:
    from agent.fleet.plan import Rollout

__all__ = ["LiveTable", "PlainLines", "progress_for", "summary", "table"]

_COLOURS = {
    "succeeded": "green",
    "rolled_back": "cyan",
    "failed": "red",
    "rejected": "red",
    "rollback_failed": "red",
    "unknown": "yellow",
    "rollback_unknown": "yellow",
    "sent": "blue",
    "uploading": "magenta",
}


def summary(rollout: Rollout) -> str:
    """One line: id, state, counts, reason."""
    tally = ", ".join(f"{n} {state}" for state, n in sorted(counts(rollout.targets).items()))
    why = f" ({rollout.reason})" if rollout.reason else ""
    return f"rollout {rollout.id}: {rollout.state}{why}; {len(rollout.targets)} cameras: {tally}"


def table(rollout: Rollout) -> Table:
    """Every camera of the rollout, with its wave, state and error."""
    shown = Table(title=summary(rollout), title_justify="left")
    for column in ("wave", "agent", "camera", "name", "state", "error"):
        shown.add_column(column)
    for target in rollout.targets:
        error = target.rollback_error or target.error
        colour = _COLOURS.get(target.state, "")
        shown.add_row(
            str(target.wave or ""),
            target.agent,
            target.camera,
            target.name,
            f"[{colour}]{target.state}[/]" if colour else target.state,
            f"{error.code}: {error.message}" if error else "",
        )
    return shown


class PlainLines:
    """A line per change of a camera's state or of the rollout's (for logs and pipes)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._seen: dict[tuple[str, str], str] = {}
        self._state = ""

    def update(self, rollout: Rollout) -> None:
        for target in rollout.targets:
            key = (target.agent, target.camera)
            if self._seen.get(key, "pending") != target.state:
                self._seen[key] = target.state
                error = target.rollback_error or target.error
                why = f" ({error.code}: {error.message})" if error else ""
                wave = f"wave {target.wave}: " if target.wave else ""
                print(f"{wave}{target.label} {target.state}{why}", file=self._out, flush=True)
        if rollout.state != self._state:
            self._state = rollout.state
            print(summary(rollout), file=self._out, flush=True)

    def close(self) -> None:
        """Nothing to tear down."""


class LiveTable:
    """A rich table redrawn in place on every change."""

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, auto_refresh=False, transient=False)
        self._live.start()

    def update(self, rollout: Rollout) -> None:
        self._live.update(table(rollout), refresh=True)

    def close(self) -> None:
        self._live.stop()


def progress_for(out: TextIO | None = None) -> LiveTable | PlainLines:
    out = out or sys.stdout
    if out.isatty():
        return LiveTable(Console(file=out))
    return PlainLines(out)
