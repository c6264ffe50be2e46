"""CPU cost of output shaping (counts, presence, min_confidence, max_rate) in the reporter.

    .venv/bin/python -m bench.shaping [--streams 8] [--fps 30] [--objects 3] [--frames 30000]

The real `Reporter.on_output` turns simulated frames (the simulator's own `_Detector`) into
messages for 8 streams, round robin, as fast as it can; the publisher it writes to only keeps
the byte count, so what is measured is the host-side work per frame: filtering, counting and
presence, encoding. The baseline is the same reporter and frames with no shaping (the route
of a network that is not counted, no filter, every frame published: the agent before output
shaping), measured in the same run. The cost at `streams x fps` is the per-frame CPU times
the frame rate, as a share of one core.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.cameras.simulator import _Detector  # the frames the agent's simulator makes
from agent.messages import OutputOptions
from agent.reporter import Reporter
from agent.status import Route
from agent.topics import Topics
from bench._common import Row, Table, cli

if TYPE_CHECKING:
    from agent.cameras.base import Output
    from agent.messages import ReplyTo

__all__ = ["Options", "measure"]


@dataclass(frozen=True, slots=True)
class Options:
    streams: int = 8
    fps: float = 30.0
    objects: int = 3
    frames: int = 30_000  # per variant
    repeats: int = 3  # the best of these, per variant


class _Sink:
    """A publisher that takes everything at once and keeps only the byte count."""

    def __init__(self) -> None:
        self.bytes = 0
        self.retained = 0

    def retain(self, topic: str, payload: bytes) -> None:
        self.retained += 1
        self.bytes += len(payload)

    def send(self, topic: str, payload: bytes) -> None:
        self.bytes += len(payload)

    def send_reply(self, reply: ReplyTo, payload: bytes) -> None:
        self.bytes += len(payload)

    def report(self, topic: str, payload: bytes) -> None:
        self.bytes += len(payload)

    @property
    def has_room_for_detections(self) -> bool:
        return True

    def count_dropped_detection(self) -> None:
        raise AssertionError("the sink never drops")

    def offer(self, topic: str, payload: bytes) -> None:
        self.bytes += len(payload)


def _frames(options: Options) -> list[Output]:
    makers = [
        _Detector("BENCH", f"CAM_{chr(65 + i % 8)}{i}", objects=options.objects, classes=21,
                  threshold=0.5, spatial=False)
        for i in range(options.streams)
    ]  # fmt: skip
    return [makers[n % options.streams](n // options.streams, 0.0) for n in range(options.frames)]


def _variant(options: Options, frames: list[Output], output: OutputOptions | None) -> float:
    """CPU µs per frame through `Reporter.on_output`; `output` None: no shaping at all."""
    topics = Topics.for_agent("bench", "shaping")
    best = float("inf")
    for _ in range(options.repeats):
        sink = _Sink()
        reporter = Reporter(sink, topics)
        streams = sorted({f.stream for f in frames})
        routes = {
            stream: Route(
                topic=topics.detections("BENCH", stream),
                model_sha256="0" * 64,
                type="MobileNet",
                labels=tuple(f"class{i}" for i in range(21)),
                output=output or OutputOptions(),
                counts_topic=None if output is None else topics.counts("BENCH", stream),
            )
            for stream in streams
        }
        reporter.routes("BENCH", routes, routes.keys())
        start = time.process_time()
        for frame in frames:
            reporter.on_output(frame)
        best = min(best, (time.process_time() - start) / len(frames) * 1e6)
    return best


def measure(options: Options) -> Table:
    frames = _frames(options)
    rate = options.streams * options.fps
    variants = {
        "no shaping (baseline)": None,
        "counts + presence": OutputOptions(),
        "counts + presence + min_confidence 0.7": OutputOptions(min_confidence=0.7),
        "counts + presence + max_rate 2": OutputOptions(max_rate=2.0),
        "counts only (max_rate 0)": OutputOptions(max_rate=0.0),
    }
    cost = {name: _variant(options, frames, output) for name, output in variants.items()}
    base = cost["no shaping (baseline)"]
    rows = [
        Row(
            name,
            f"{us:.1f} µs/frame = {us * rate / 1e4:.2f} % of a core",
            f"{base:.1f} µs/frame" if output is not None else "",
            f"{us / base:.2f}x" if output is not None else "",
        )
        for (name, output), us in zip(variants.items(), cost.values(), strict=True)
    ]
    notes = [
        f"{options.streams} streams x {options.fps:g} fps = {rate:g} frames/s, "
        f"{options.objects} objects per frame, {options.frames} frames per variant, best of "
        f"{options.repeats}; CPU time of Reporter.on_output only (simulated frames made "
        "beforehand, publishing = keeping the byte count)",
        "counting: filtering rows, per-label counts, presence hysteresis, counts messages on "
        "change (the simulator's moving objects change confidence, not labels: counts rarely "
        "change); max_rate skips the encoding of frames above the rate",
    ]
    return Table("shaping: host-side CPU of counting and rate limits per frame", rows, notes)


if __name__ == "__main__":
    sys.exit(cli("shaping", measure, Options, __doc__))
