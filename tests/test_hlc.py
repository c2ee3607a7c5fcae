"""The hybrid logical clock under hostile input: a peer's timestamp moves it only
within max_ahead_ms of the wall clock, and nothing makes it leave its uint64
encoding (issue 9, item 3 A: one forged 2**64-1 used to break every later put)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsmesh.node import hlc
from pacsmesh.node.config import parse
from pacsmesh.node.errors import ConfigError
from pacsmesh.node.hlc import HLC_MAX, LOGICAL_MAX, MS_MAX, HybridClock, decode, encode

WALL_MS = 1_700_000_000_000
AHEAD_MS = 300_000


class Wall:
    """A wall clock the test sets."""

    def __init__(self, ms: int = WALL_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_a_forged_maximum_is_refused_and_the_clock_keeps_working() -> None:
    clock = HybridClock(Wall(), max_ahead_ms=AHEAD_MS)
    before = clock.now()
    assert clock.too_far_ahead(HLC_MAX)
    assert clock.observe(HLC_MAX) is False
    after = clock.now()
    assert after == before + 1  # untouched by the forgery: next logical tick
    assert decode(after)[0] == WALL_MS


def test_observe_moves_the_clock_up_to_the_bound_exactly() -> None:
    wall = Wall()
    clock = HybridClock(wall, max_ahead_ms=AHEAD_MS)
    at_bound = encode(WALL_MS + AHEAD_MS, 7)
    assert clock.observe(encode(WALL_MS + AHEAD_MS + 1, 0)) is False
    assert clock.observe(at_bound) is True
    assert clock.now() == at_bound + 1  # orders after what it saw
    assert clock.observe(encode(WALL_MS - 1000, 0)) is True  # the past: nothing moves
    assert clock.now() == at_bound + 2
    # a peer that was refused is taken once our wall clock has caught up
    late = encode(WALL_MS + 2 * AHEAD_MS, 0)
    assert clock.observe(late) is False
    wall.ms += AHEAD_MS
    assert clock.observe(late) is True and clock.now() == late + 1


def test_values_outside_uint64_are_too_far_ahead() -> None:
    clock = HybridClock(Wall())
    assert clock.too_far_ahead(-1) and clock.too_far_ahead(HLC_MAX + 1)
    assert not clock.observe(HLC_MAX + 1) and not clock.observe(-1)


def test_now_never_leaves_uint64_even_at_the_end_of_time() -> None:
    wall = Wall(MS_MAX + 10**6)  # a wall clock gone mad: clipped to the encoding
    clock = HybridClock(wall)
    stamps = [clock.now() for _ in range(LOGICAL_MAX + 10)]
    assert stamps[0] == encode(MS_MAX, 0)
    assert all(0 < s <= HLC_MAX for s in stamps) and stamps[-1] == HLC_MAX
    wall.ms = -5  # and one before 1970
    assert clock.now() == HLC_MAX


def test_a_full_logical_counter_borrows_the_next_millisecond() -> None:
    clock = HybridClock(Wall())
    assert clock.observe(encode(WALL_MS, LOGICAL_MAX))
    assert clock.now() == encode(WALL_MS + 1, 0)


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_ahead_ms"):
        HybridClock(max_ahead_ms=0)


def test_max_clock_ahead_s_is_configured_and_checked(tmp_path: Path) -> None:
    node = {"data_dir": str(tmp_path), "listen": "127.0.0.1:7400"}
    assert parse({"node": node}).cluster.max_clock_ahead_s == AHEAD_MS / 1000
    assert hlc.MAX_AHEAD_MS_DEFAULT == AHEAD_MS
    assert parse({"node": node, "cluster": {"max_clock_ahead_s": 60}}
                 ).cluster.max_clock_ahead_s == 60.0
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_clock_ahead_s"):
            parse({"node": node, "cluster": {"max_clock_ahead_s": bad}})
    with pytest.raises(ConfigError, match="gossip_interval_s"):
        parse({"node": node, "cluster": {"gossip_interval_s": 0.001}})
