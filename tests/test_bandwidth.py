"""The outbound limits' arithmetic and the relay split, driven without IO: windows,
token buckets under a simulated clock, strict priority, and how feeders share the
chunks of a study (cluster/bandwidth.py, cluster/fetch.py relay_for)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from pathlib import Path

import pytest

from pacsmesh.cluster.bandwidth import (
    FRESH,
    MB,
    REBALANCE,
    REPAIR,
    Limits,
    Shaper,
    TokenBucket,
    Window,
    limits_from_config,
    parse_window,
)
from pacsmesh.cluster.fetch import relay_for
from pacsmesh.node.config import parse
from pacsmesh.node.errors import ConfigError


def test_windows_parse_wrap_midnight_and_refuse_nonsense() -> None:
    w = parse_window("19:00-07:00")
    assert w == Window(19 * 60, 7 * 60) and str(w) == "19:00-07:00"
    assert w.contains(19 * 60) and w.contains(23 * 60 + 59) and w.contains(0)
    assert w.contains(6 * 60 + 59) and not w.contains(7 * 60) and not w.contains(12 * 60)
    assert w.minutes_until_open(12 * 60) == 7 * 60 and w.minutes_until_open(20 * 60) == 0
    day = parse_window("08:30-17:00")
    assert day is not None and day.contains(8 * 60 + 30) and not day.contains(17 * 60)
    assert day.minutes_until_open(18 * 60) == (24 - 18) * 60 + 8 * 60 + 30
    assert parse_window("") is None and parse_window("  ") is None
    assert parse_window("22:00-24:00") == Window(22 * 60, 24 * 60)
    for bad in ("19-07", "7pm-7am", "25:00-07:00", "19:60-07:00", "10:00-10:00", "24:30-01:00"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_every_minute_of_the_day_is_classified_once() -> None:
    w = Window(19 * 60, 7 * 60)
    inside = sum(w.contains(m) for m in range(1440))
    assert inside == 12 * 60


def test_bucket_holds_its_rate_over_a_long_run_with_chunks_larger_than_the_burst() -> None:
    now = 0.0
    bucket = TokenBucket(2 * MB, now)
    sent = 0
    chunk = 3 * MB // 2  # larger than the burst of 0.5 MB... but at least 1 MiB
    while now < 600:  # ten simulated minutes
        delay = bucket.delay(now)
        if delay > 0:
            now += delay
            continue
        bucket.charge(chunk, now)
        sent += chunk
    rate = sent / now
    assert abs(rate - 2 * MB) / (2 * MB) < 0.01, rate


def test_deferral_only_for_bulk_outside_the_window() -> None:
    lim = Limits(bulk_window=Window(19 * 60, 7 * 60))
    assert lim.deferral(FRESH, 12 * 60, "12:00", "boston") == ""
    why = lim.deferral(REPAIR, 12 * 60, "12:00", "boston")
    assert "bulk window 19:00-07:00" in why and "opens in 7 h 00 min" in why
    assert "repair" in why and why.startswith("deferred")
    assert "rebalance" in lim.deferral(REBALANCE, 12 * 60, "12:00", "boston")
    assert lim.deferral(REBALANCE, 20 * 60, "20:00", "boston") == ""
    assert Limits().deferral(REBALANCE, 12 * 60, "12:00", "b") == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shaper_on(clock: FakeClock, limits: Limits, senders: int) -> Shaper:
    """A shaper whose sleeps advance the simulated clock (each sleeping sender moves
    it a share, so concurrent senders see time pass once)."""

    async def fake_sleep(delay: float) -> None:
        clock.now += delay / senders
        await asyncio.sleep(0)

    return Shaper(limits, "boston", clock=clock, sleep=fake_sleep)


async def _drive(shaper: Shaper, clock: FakeClock, senders: dict[str, tuple[str, int]],
                 chunk: int, until_s: float) -> dict[str, int]:
    """Run senders (name -> (peer, purpose)) concurrently until `until_s`."""
    sent: collections.Counter[str] = collections.Counter()

    async def run(name: str, peer: str, purpose: int) -> None:
        while clock.now < until_s:
            await shaper.send(peer, purpose, chunk)
            sent[name] += chunk

    await asyncio.gather(*(run(n, p, pu) for n, (p, pu) in senders.items()))
    return dict(sent)


async def test_fresh_goes_first_and_bulk_gets_what_is_left() -> None:
    clock = FakeClock()
    shaper = shaper_on(clock, Limits(rate_bps=4 * MB, bulk_rate_bps=3 * MB), 3)
    start = clock.now
    sent = await _drive(shaper, clock, {"fresh": ("seattle", FRESH),
                                        "repair": ("denver", REPAIR),
                                        "rebalance": ("chicago", REBALANCE)},
                        chunk=256 << 10, until_s=start + 300)
    elapsed = clock.now - start
    total = sum(sent.values()) / elapsed
    assert abs(total - 4 * MB) / (4 * MB) < 0.05, total
    # fresh always wants more: strict priority leaves bulk nearly nothing
    assert sent["fresh"] > 0.9 * sum(sent.values()), sent
    assert sent.get("rebalance", 0) <= sent.get("repair", 0), sent


async def test_bulk_alone_is_capped_by_the_bulk_rate_and_peers_by_their_override() -> None:
    clock = FakeClock()
    shaper = shaper_on(clock, Limits(rate_bps=10 * MB, bulk_rate_bps=2 * MB,
                                     peer_bps={"seattle": 1 * MB}), 2)
    start = clock.now
    sent = await _drive(shaper, clock, {"repair": ("denver", REPAIR),
                                        "seattle": ("seattle", FRESH)},
                        chunk=128 << 10, until_s=start + 300)
    elapsed = clock.now - start
    assert abs(sent["repair"] / elapsed - 2 * MB) / (2 * MB) < 0.05, sent
    assert abs(sent["seattle"] / elapsed - 1 * MB) / (1 * MB) < 0.05, sent


async def test_unlimited_never_waits() -> None:
    shaper = Shaper(Limits(), "boston")
    started = time.monotonic()
    for _ in range(50_000):
        await shaper.send("seattle", REBALANCE, 1 << 20)
    assert time.monotonic() - started < 5
    assert shaper.sent[REBALANCE] == 50_000 << 20


def test_transfer_config_is_checked(tmp_path: Path) -> None:
    base = {"node": {"data_dir": str(tmp_path), "listen": "127.0.0.1:7400"}}
    cfg = parse({**base, "transfer": {"rate_mb_s": 12.5, "bulk_rate_mb_s": 4,
                                      "bulk_window": "19:00-07:00",
                                      "peers": {"seattle": 2}}})
    t = cfg.transfer
    assert (t.rate_mb_s, t.bulk_rate_mb_s, t.bulk_window, t.peers) == (
        12.5, 4.0, "19:00-07:00", {"seattle": 2.0})
    lim = limits_from_config(t.rate_mb_s, t.bulk_rate_mb_s, t.bulk_window, t.peers)
    assert lim.rate_bps == 12.5 * MB and lim.peer_bps == {"seattle": 2 * MB}
    for bad, msg in (({"rate_mb_s": -1}, "must be >= 0"),
                     ({"bulk_window": "7pm-7am"}, "bulk_window"),
                     ({"peers": {"seattle": 0}}, "MB/s > 0"),
                     ({"peers": {"seattle": "fast"}}, "MB/s > 0"),
                     ({"rate": 3}, "unknown key 'rate'")):
        with pytest.raises(ConfigError, match=msg):
            parse({**base, "transfer": bad})


def test_relay_split_spreads_chunks_evenly_and_every_replica_agrees() -> None:
    feeders = ["seattle", "denver", "atlanta"]
    owners: collections.Counter[str] = collections.Counter()
    for i in range(30_000):
        chunk = hashlib.blake2b(i.to_bytes(4, "big")).digest()
        views = {me: relay_for(me, feeders, chunk) for me in feeders}
        drawers = [me for me, feeder in views.items() if feeder is None]
        assert len(drawers) == 1, views  # exactly one replica draws it from the source
        assert all(f == drawers[0] for f in views.values() if f is not None)
        owners[drawers[0]] += 1
    for n in feeders:
        assert abs(owners[n] - 10_000) < 500, owners
    # a lone feeder, or a node that is not one, fetches for itself
    assert relay_for("seattle", ["seattle"], b"x" * 32) is None
    assert relay_for("boston", feeders, b"x" * 32) is None
