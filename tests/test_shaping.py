"""The shaping rules (agent/shaping.py) on a made-up clock: no event loop, no broker."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.messages import OutputOptions
from agent.shaping import RateGate, Shaper, confident

FPS = 20.0
FRAME = 1.0 / FPS


def shaper(labels: tuple[str, ...] | None = ("person", "car"), **options: float) -> Shaper:
    # counts_max_rate high: these tests look at the counting rules, not the rate limit
    return Shaper(OutputOptions(**{"counts_max_rate": 1000.0, **options}), labels)  # type: ignore[arg-type]


def run(
    s: Shaper, frames: list[list[int]], start: float = 0.0
) -> list[tuple[int, dict[str, int], tuple[str, ...]]]:
    """Feed one frame per 1/FPS s; return what would be published, as (total, by_label, present)."""
    out = []
    for i, labels in enumerate(frames):
        counts = s.observe(labels, start + i * FRAME, i)
        if counts is not None:
            out.append((counts.total, counts.by_label, counts.present))
    return out


# --- counts ---------------------------------------------------------------------------------


def test_counts_go_out_only_when_they_change_and_keep_labels_seen_once() -> None:
    s = shaper(on_frames=1, off_seconds=100.0)
    published = run(s, [[], [], [0, 0], [0, 0], [0, 0, 1], [0, 0, 1], [0], [], []])
    assert published == [
        (0, {}, ()),
        (2, {"person": 2}, ("person",)),
        (3, {"person": 2, "car": 1}, ("person", "car")),
        (1, {"person": 1, "car": 0}, ("person", "car")),
        (0, {"person": 0, "car": 0}, ("person", "car")),
    ]


def test_labels_without_names_are_indices_and_unknown_indices_too() -> None:
    s = shaper(labels=None, on_frames=1)
    assert run(s, [[3, 3, 0]])[0][1] == {"3": 2, "0": 1}
    named = shaper(labels=("person",), on_frames=1)
    assert run(named, [[0, 7]])[0][1] == {"person": 1, "7": 1}


def test_seq_counts_the_messages_and_frame_seq_names_the_frame() -> None:
    s = shaper(on_frames=1)
    first = s.observe([0], 0.0, 41)
    assert first is not None
    assert (first.seq, first.frame_seq) == (1, 41)
    assert s.observe([0], FRAME, 42) is None  # unchanged
    second = s.observe([], 2 * FRAME, 43)
    assert second is not None
    assert (second.seq, second.frame_seq) == (2, 43)


def test_nothing_before_the_first_frame() -> None:
    s = shaper()
    assert s.tick(0.0) is None
    assert s.tick(10.0) is None
    assert s.observe([], 10.1) is not None


# --- presence -------------------------------------------------------------------------------


def test_present_after_on_frames_consecutive_frames() -> None:
    s = shaper(on_frames=3, off_seconds=100.0)
    presents = [p for _, _, p in run(s, [[0], [], [0], [0], [], [0], [0], [0], [0]])]
    # one frame, then two: not yet; three in a row: present
    assert presents[-1] == ("person",)
    assert all(p == () for p in presents[:-1])


def test_a_single_missed_frame_does_not_make_it_absent() -> None:
    s = shaper(on_frames=2, off_seconds=1.0)
    frames = [[0]] * 10 + [[]] + [[0]] * 10
    published = run(s, frames)
    assert [p for _, _, p in published] == [(), ("person",), ("person",), ("person",)]
    # the missed frame changed the count (1 -> 0 -> 1), never the presence
    assert [t for t, _, _ in published] == [1, 1, 0, 1]


def test_absent_after_off_seconds_without_it_even_without_frames() -> None:
    s = shaper(on_frames=1, off_seconds=3.0)
    s.observe([0], 0.0)
    s.observe([], FRAME)  # count 0, still present
    assert s.tick(2.9) is None
    gone = s.tick(3.0)
    assert gone is not None
    assert (gone.total, gone.present) == (0, ())


def test_without_frames_a_stale_count_goes_to_zero_with_the_presence() -> None:
    s = shaper(on_frames=2, off_seconds=3.0)
    s.observe([0, 0, 1], 0.0)  # person twice: not yet present; then the frames stop
    s.observe([0, 0], FRAME)
    assert s.tick(2.0) is None
    later = s.tick(3.1)
    assert later is not None
    assert (later.total, later.by_label, later.present) == (0, {"person": 0, "car": 0}, ())


# --- rate limits ----------------------------------------------------------------------------


def test_counts_held_back_by_the_rate_go_out_when_the_window_opens() -> None:
    s = Shaper(OutputOptions(counts_max_rate=2.0, on_frames=1, off_seconds=100.0), ("a",))
    assert s.observe([0], 0.0) is not None
    assert s.observe([0, 0], 0.05) is None  # within the window: held
    assert s.observe([0, 0, 0], 0.10) is None
    assert s.tick(0.20) is None
    latest = s.tick(0.5)  # the window opened: the latest state, not the first held one
    assert latest is not None
    assert latest.total == 3
    assert s.tick(0.6) is None  # nothing new


def test_a_change_undone_within_the_window_publishes_nothing() -> None:
    s = Shaper(OutputOptions(counts_max_rate=2.0, on_frames=1, off_seconds=100.0), ("a",))
    assert s.observe([0], 0.0) is not None
    assert s.observe([0, 0], 0.1) is None
    assert s.observe([0], 0.2) is None
    assert s.tick(1.0) is None


def test_max_rate_zero_lets_nothing_through_and_none_everything() -> None:
    never, always = RateGate(0.0), RateGate(None)
    times = [i * 0.01 for i in range(100)]
    assert not any(never.allow(t) for t in times)
    assert all(always.allow(t) for t in times)


def test_max_rate_at_30_fps_halved() -> None:
    gate = RateGate(15.0)
    passed = sum(gate.allow(i / 30.0) for i in range(300))  # 10 s
    # every other frame; the tolerance may let one more through over the whole run
    assert 150 <= passed <= 151


@settings(max_examples=200)
@given(
    rate=st.floats(0.1, 100.0),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=300),
    tolerance=st.sampled_from([0.0, 0.5]),
)
def test_rate_gate_bound_over_any_window(rate: float, gaps: list[float], tolerance: float) -> None:
    gate = RateGate(rate, tolerance=tolerance)
    times = list(np.cumsum(gaps))
    passed = [t for t in times if gate.allow(t)]
    interval = 1.0 / rate
    for i, start in enumerate(passed):
        for j in range(i, len(passed)):
            window = passed[j] - start
            assert j - i + 1 <= 1 + (window + tolerance * interval) / interval + 1e-9
    if tolerance == 0.0:  # strict: never two closer than the interval
        assert all(b - a >= interval - 1e-9 for a, b in itertools.pairwise(passed))


@settings(max_examples=200)
@given(
    frames=st.lists(st.lists(st.integers(0, 3), max_size=4), min_size=1, max_size=200),
    on_frames=st.integers(1, 5),
    off_seconds=st.floats(0.2, 5.0),
)
def test_presence_never_flips_on_a_single_missed_frame(
    frames: list[list[int]], on_frames: int, off_seconds: float
) -> None:
    s = shaper(labels=None, on_frames=on_frames, off_seconds=off_seconds)
    present: set[str] = set()
    history: list[set[str]] = []
    seen: list[set[str]] = []
    for i, labels in enumerate(frames):
        counts = s.observe(labels, i * FRAME, i)
        if counts is not None:
            present = set(counts.present)
        history.append(present)
        seen.append({str(label) for label in labels})
    for i in range(len(frames)):
        before = history[i - 1] if i else set()
        went = before - history[i]
        for label in went:
            # it went absent: not seen for at least off_seconds (more than one frame at 20 fps
            # whenever off_seconds exceeds a frame)
            unseen = [k for k in range(i + 1) if label in seen[k]]
            assert i * FRAME - unseen[-1] * FRAME >= off_seconds - 1e-9
        came = history[i] - before
        for label in came:
            # it came: seen in the last on_frames frames in a row
            assert i + 1 >= on_frames
            assert all(label in seen[k] for k in range(i - on_frames + 1, i + 1))


@settings(max_examples=100)
@given(frames=st.lists(st.lists(st.integers(0, 3), max_size=4), min_size=1, max_size=100))
def test_published_counts_always_differ_from_the_previous_and_match_the_frame(
    frames: list[list[int]],
) -> None:
    s = shaper(labels=None, on_frames=1, off_seconds=1000.0)
    previous = None
    for i, labels in enumerate(frames):
        counts = s.observe(labels, i * FRAME, i)
        if counts is None:
            continue
        state = (counts.by_label, counts.present)
        assert state != previous
        previous = state
        assert counts.total == len(labels) == sum(counts.by_label.values())
        for label in labels:
            assert counts.by_label[str(label)] == labels.count(label)


def test_confident_keeps_rows_at_or_above_the_minimum() -> None:
    rows = np.array([[0, 0.3, 0, 0, 1, 1], [1, 0.8, 0, 0, 1, 1], [2, 0.5, 0, 0, 1, 1]], np.float32)
    assert confident(rows, None) is rows
    assert confident(rows, 0.5)[:, 0].tolist() == [1.0, 2.0]
    assert len(confident(rows, 0.9)) == 0
    empty = np.zeros((0, 6), np.float32)
    assert len(confident(empty, 0.5)) == 0
