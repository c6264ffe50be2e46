"""Output shaping for one stream: rate limits, counts per label, presence with hysteresis.

Pure: no I/O, no event loop; every method takes the time (`now`, monotonic seconds) from its
caller, so the rules test with a made-up clock. `agent.reporter` turns what it returns into
messages.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy.typing as npt

    from agent.messages import OutputOptions

__all__ = ["Counts", "RateGate", "Shaper", "confident"]


class RateGate:
    """Lets at most `rate` events a second through; `None`: all of them, `0`: none.

    A generic cell rate algorithm: over any window of T seconds at most
    `1 + (T + tolerance * interval) / interval` pass. A tolerance (a share of the interval)
    keeps frames arriving with jitter around the allowed rate from being thinned below it;
    without one, consecutive events are never closer than the interval.
    """

    def __init__(self, rate: float | None, *, tolerance: float = 0.5) -> None:
        self._interval: float | None = None
        if rate is not None:
            self._interval = math.inf if rate == 0 else 1.0 / rate
        self._tolerance = tolerance
        self._due = -math.inf  # the theoretical time of the next event

    def allow(self, now: float) -> bool:
        """True (and counted) when an event at `now` may pass."""
        interval = self._interval
        if interval is None:
            return True
        if interval == math.inf or now < self._due - interval * self._tolerance:
            return False
        self._due = max(self._due, now) + interval
        return True


def confident(rows: npt.NDArray[np.float32], minimum: float | None) -> npt.NDArray[np.float32]:
    """The detection rows (label, confidence, ...) whose confidence is at least `minimum`."""
    if minimum is None or not len(rows):
        return rows
    kept: npt.NDArray[np.float32] = rows[rows[:, 1] >= np.float32(minimum)]
    return kept


@dataclass(frozen=True, slots=True)
class Counts:
    """A counts message to publish: objects per label in the latest frame, and who is present."""

    total: int
    by_label: dict[str, int]
    present: tuple[str, ...]
    seq: int  # counts published for this stream: 1, 2, ...
    frame_seq: int


class Shaper:
    """One stream's shaping state; `labels` names the label indices when given."""

    def __init__(self, options: OutputOptions, labels: tuple[str, ...] | None) -> None:
        self.options = options
        self._labels = labels
        self._detections = RateGate(options.max_rate)
        # strict: counts messages never closer than 1 / counts_max_rate
        self._counts_gate = RateGate(options.counts_max_rate, tolerance=0.0)
        self._by_label: dict[str, int] = {}  # every label seen: objects in the latest frame
        self._streak: dict[str, int] = {}  # consecutive frames with the label, up to on_frames
        self._last_seen: dict[str, float] = {}
        self._present: set[str] = set()
        self._published: tuple[tuple[tuple[str, int], ...], tuple[str, ...]] | None = None
        self._seq = 0
        self._frame_seq: int | None = None  # None until the first frame

    def allow_detections(self, now: float) -> bool:
        """True when a per-frame message may go out now (`max_rate`)."""
        return self._detections.allow(now)

    def name(self, label: int) -> str:
        labels = self._labels
        if labels is not None and 0 <= label < len(labels):
            return labels[label]
        return str(label)

    def observe(self, labels: Iterable[int], now: float, frame_seq: int = 0) -> Counts | None:
        """Take one frame's detected labels; return the counts to publish now, if any."""
        self._frame_seq = frame_seq
        seen = Counter(self.name(label) for label in labels)
        for name in seen:
            self._by_label.setdefault(name, 0)
        on_frames = self.options.on_frames
        for name in self._by_label:
            count = self._by_label[name] = seen.get(name, 0)
            if count:
                self._last_seen[name] = now
                streak = self._streak[name] = min(self._streak.get(name, 0) + 1, on_frames)
                if streak >= on_frames:
                    self._present.add(name)
            else:
                self._streak[name] = 0
        return self.tick(now)

    def tick(self, now: float) -> Counts | None:
        """Let time pass: labels unseen for `off_seconds` go absent (and count 0: no frame may
        have come to say so), and a change held back by `counts_max_rate` is returned once the
        window opens."""
        off = self.options.off_seconds
        for name, last_seen in self._last_seen.items():
            if now - last_seen >= off:
                self._present.discard(name)
                # without frames (a camera restarting or gone) the latest count is stale
                self._by_label[name] = 0
        by_label = tuple(self._by_label.items())
        present = tuple(name for name in self._by_label if name in self._present)
        state = (by_label, present)
        if (
            self._frame_seq is None  # nothing counted yet
            or state == self._published
            or not self._counts_gate.allow(now)
        ):
            return None
        self._published = state
        self._seq += 1
        return Counts(
            total=sum(count for _, count in by_label),
            by_label=dict(by_label),
            present=present,
            seq=self._seq,
            frame_seq=self._frame_seq,
        )
