"""Pure rules: disk and growth alerts, safety of a study, trim decisions, digests."""

from __future__ import annotations

from pacsmesh.cluster import antientropy, repair
from pacsmesh.cluster.placement import partition_of as placement_partition_of
from pacsmesh.cluster.safety import Holding, Position, assess
from pacsmesh.node import alerts
from pacsmesh.node.catalog import EMPTY_DIGEST, digest_add
from pacsmesh.node.catalog import partition_of as catalog_partition_of

BOSTON = Position("b", "Boston", 42.3601, -71.0589, True)
NEW_YORK = Position("n", "New York", 40.7128, -74.0060, True)
CHICAGO = Position("c", "Chicago", 41.8781, -87.6298, True)
DENVER = Position("d", "Denver", 39.7392, -104.9903, True)
POSITIONS = {p.node_id: p for p in (BOSTON, NEW_YORK, CHICAGO, DENVER)}


def test_disk_thresholds() -> None:
    assert alerts.disk_alerts("n", 0.50) == []
    assert [a.code for a in alerts.disk_alerts("n", 0.86)] == ["DISK_85"]
    assert [a.code for a in alerts.disk_alerts("n", 0.91)] == ["DISK_90"]
    full = alerts.disk_alerts("n", 0.96)
    assert [a.code for a in full] == ["DISK_FULL"] and "refuses new replicas" in full[0].message


def test_days_until_full_projection() -> None:
    g = alerts.GrowthTracker()
    g.add(1_000, now=0.0)
    assert g.bytes_per_day(1_000, now=30.0) is None  # too little history to say
    g.add(1_000 + 10**9, now=86_400.0)
    per_day = g.bytes_per_day(1_000 + 10**9, now=86_400.0)
    assert per_day is not None and abs(per_day - 1e9) < 1e3
    days = alerts.days_until_full(5 * 10**9, per_day)
    assert days is not None and abs(days - 5.0) < 0.01
    (a,) = alerts.growth_alerts("n", days, per_day)
    assert a.code == "DISK_FILLING" and a.severity == "critical" and "5.0 days" in a.message
    assert alerts.growth_alerts("n", 400.0, per_day) == []
    assert alerts.days_until_full(10, 0.0) is None


def test_scrub_alerts() -> None:
    assert alerts.scrub_alerts("n", False, 86400, 0, 0, []) == []
    codes = [a.code for a in alerts.scrub_alerts("n", True, 86400, 2, 2, [])]
    assert codes == ["SCRUB_OVERDUE", "CORRUPTION_REPAIRED"]
    (a,) = alerts.scrub_alerts("n", False, 86400, 1, 0, ["instance 1.2 of study 1"])
    assert a.code == "CORRUPTION_UNREPAIRABLE" and "study 1" in a.message


def _digest(*ids: bytes) -> bytes:
    d = EMPTY_DIGEST
    for i in ids:
        d = digest_add(d, i)
    return d


def test_adhash_is_order_free_and_subtractable() -> None:
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert _digest(a, b, c) == _digest(c, a, b)
    assert digest_add(_digest(a, b, c), b, -1) == _digest(a, c)
    assert _digest(a) != _digest(b)


def test_a_holder_counts_only_with_every_current_instance_verified() -> None:
    ids = [bytes([i]) * 32 for i in range(3)]
    full = _digest(*ids)
    holdings = [Holding("b", 3, full), Holding("c", 3, full), Holding("d", 2, _digest(*ids[:2]))]
    v = assess(3, full, holdings, POSITIONS, 250)
    assert v.full_holders == ("b", "c") and v.safe_copies == 2
    stale = [Holding("d", 3, _digest(ids[0], ids[1], b"x" * 32))]  # other versions
    assert assess(3, full, stale, POSITIONS, 250).full_holders == ()
    dead = {**POSITIONS, "c": Position("c", "Chicago", 41.8781, -87.6298, False)}
    assert assess(3, full, holdings, dead, 250).full_holders == ("b",)


def test_close_sites_count_once() -> None:
    d = _digest(b"z" * 32)
    holdings = [Holding("b", 1, d), Holding("n", 1, d), Holding("c", 1, d)]
    assert assess(1, d, holdings, POSITIONS, 250).safe_copies == 2  # Boston ~ New York


def test_trim_only_when_the_replica_set_is_safe_without_me() -> None:
    d = _digest(b"q" * 32)
    replicas = ("b", "c", "d")
    safe = [Holding(n, 1, d) for n in replicas]
    assert repair.may_trim("n", "b", replicas, 1, d, safe, POSITIONS, 3, 250)
    assert not repair.may_trim("n", "n", replicas, 1, d, safe, POSITIONS, 3, 250)  # origin
    assert not repair.may_trim("b", "x", replicas, 1, d, safe, POSITIONS, 3, 250)  # a member
    assert not repair.may_trim("n", "b", replicas, 1, d, safe[:2], POSITIONS, 3, 250)
    wrong = [*safe[:2], Holding("d", 1, _digest(b"other" * 7))]
    assert not repair.may_trim("n", "b", replicas, 1, d, wrong, POSITIONS, 3, 250)


def test_antientropy_descends_only_where_digests_differ() -> None:
    mine = [(b"\x00" * 32, 0), (b"\x01" * 32, 5), (b"\x02" * 32, 7)]
    theirs = [(b"\x09" * 32, 3), (b"\x01" * 32, 5), (b"\x03" * 32, 0)]
    assert antientropy.differing_partitions(mine, theirs) == [0]  # p2: they have nothing
    studies = antientropy.differing_studies(
        {"s1": (b"x", 2), "s2": (b"y", 1)}, [("s1", b"x", 2), ("s2", b"z", 2), ("s3", b"w", 1)])
    assert studies == ["s2", "s3"]
    assert antientropy.missing({b"a"}, [b"a", b"b"]) == [b"b"]


def test_node_and_cluster_agree_on_partitions() -> None:
    for uid in ("1.2.3", "1.2.826.0.1.3680043.10.1455.1.0.1", "9" * 64):
        for p in (1, 64, 1024):
            assert catalog_partition_of(uid, p) == placement_partition_of(uid, p)
