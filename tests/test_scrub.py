"""The scrubber against real damage in real node processes.

A three-site cluster (Boston, Chicago, Denver; 3 copies) stores a study; then one
running node's packs are damaged on disk (bytes flipped at seeded random offsets,
a pack truncated, a pack deleted). One scrub pass (`scrub --now`) must find every
damaged chunk and repair it from a peer, and no `get` from that node, before or
after the repair, may return a wrong byte. A chunk whose every copy is damaged is
reported as unrepairable by name and never served. A pass interrupted by SIGTERM
resumes where it stopped. Disk alerts follow the used fraction of capacity_bytes.

Timings are short ([cluster] gossip_interval_s 0.2, dead_after_s 5; [scrub]
interval_s 60, so passes run only at start and on request); every wait is a poll
with a deadline, every process is stopped in a finally.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from pacsmesh.sample import StudySpec, write_study
from tests.clusterproc import (
    Cluster,
    Study,
    alert_codes,
    holder_ids,
    make_study,
    started,
    wait_for,
)
from tests.nodeproc import NodeProc, cli, cli_json

SITES = (("boston", "Boston"), ("chicago", "Chicago"), ("denver", "Denver"))
DEAD_AFTER_S = 5.0
SCRUB = {"rate_mb_s": 100.0, "interval_s": 60.0}  # idle_s 1 s: `--now` starts within ~1 s
SAFE_TIMEOUT_S = 30.0
PASS_TIMEOUT_S = 10.0  # one pass over a few dozen chunks at 100 MB/s takes milliseconds
VIEW_TIMEOUT_S = 10.0

# A pack record: magic, version, hash algorithm, flags, reserved, key, plain length,
# stored length; then a CRC32 of those (52 bytes in all), then the stored bytes.
RECORD_HEAD = struct.Struct("<4sBBBB32sII")
RECORD_HEAD_LEN = RECORD_HEAD.size + 4
RECORD_MAGIC = b"PMCK"
FLAG_ZSTD = 0x01


# ---- pack files ------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    pack: Path
    offset: int
    length: int  # header + stored bytes
    key: bytes
    flags: int
    plain_len: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def pack_files(node: NodeProc) -> list[Path]:
    return sorted((node.data_dir / "packs").glob("pack-*.dat"))


def read_records(pack: Path) -> list[Record]:
    """Every record of an undamaged pack, in file order."""
    data = pack.read_bytes()
    out: list[Record] = []
    offset = 0
    while offset < len(data):
        assert offset + RECORD_HEAD_LEN <= len(data), f"{pack}@{offset}: cut short"
        magic, _, _, flags, _, key, plain_len, stored_len = RECORD_HEAD.unpack_from(data, offset)
        assert magic == RECORD_MAGIC, f"{pack}@{offset}: not a record"
        length = RECORD_HEAD_LEN + stored_len
        out.append(Record(pack, offset, length, key, flags, plain_len))
        offset += length
    return out


def all_records(node: NodeProc) -> list[Record]:
    return [r for p in pack_files(node) for r in read_records(p)]


def plain_bytes(rec: Record) -> bytes:
    with open(rec.pack, "rb") as f:
        f.seek(rec.offset + RECORD_HEAD_LEN)
        stored = f.read(rec.length - RECORD_HEAD_LEN)
    if rec.flags & FLAG_ZSTD:
        return bytes(zstandard.ZstdDecompressor().decompress(stored,
                                                             max_output_size=rec.plain_len))
    return stored


def flip_byte(pack: Path, offset: int) -> None:
    with open(pack, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def flip_random_records(records: list[Record], rng: random.Random, count: int) -> set[bytes]:
    """One byte flipped at a random offset (header or data) in each of `count` records."""
    picked = rng.sample(records, count)
    for rec in picked:
        flip_byte(rec.pack, rec.offset + rng.randrange(rec.length))
    return {rec.key for rec in picked}


def truncate_mid_record(records: list[Record], rng: random.Random) -> set[bytes]:
    """Cut the pack inside a record in its second half: that record and all after it go."""
    pack = records[0].pack
    victim = records[rng.randrange(len(records) // 2, len(records))]
    cut = victim.offset + rng.randrange(1, victim.length)
    with open(pack, "r+b") as f:
        f.truncate(cut)
    return {r.key for r in records if r.end > cut}


def header_record_of(records: list[Record], sop_uid: str) -> Record:
    """The record of the chunk that holds an instance's header (it names the SOP UID)."""
    pattern = re.compile(re.escape(sop_uid.encode()) + rb"(?![0-9.])")
    found = [r for r in records if pattern.search(plain_bytes(r))]
    assert len(found) == 1, (sop_uid, found)
    return found[0]


# ---- the CLI ------------------------------------------------------------------------------


def scrub_doc(node: NodeProc, *, now: bool = False) -> tuple[int, dict[str, Any]]:
    """`scrub [--now] --json`: (exit code, document)."""
    res = cli("scrub", *(["--now"] if now else []), "--json", node=node.address, timeout_s=60)
    assert res.returncode in (0, 1), (res.returncode, res.stdout, res.stderr)
    doc: dict[str, Any] = json.loads(res.stdout)
    assert res.returncode == (1 if doc["unrepairable"] else 0), (res.returncode, doc)
    return res.returncode, doc


def scrub_pass(node: NodeProc, timeout_s: float = PASS_TIMEOUT_S) -> dict[str, Any]:
    """`scrub --now`, then poll `scrub --json` until a pass that started after the request
    has completed. Returns the final document."""
    requested = time.monotonic()
    scrub_doc(node, now=True)

    def completed() -> dict[str, Any]:
        _, doc = scrub_doc(node)
        since = time.monotonic() - requested
        assert not doc["running"], doc
        assert 0 <= doc["last_pass_completed_age_s"] < since, (since, doc)
        return doc

    return wait_for(completed, timeout_s, f"a scrub pass on {node.node_id}", interval_s=0.3)


def put_safe(node: NodeProc, study: Study) -> None:
    doc = cli_json("put", str(study.folder), "--wait-safe", f"{SAFE_TIMEOUT_S:g}",
                   node=node.address, timeout_s=SAFE_TIMEOUT_S + 60)
    assert doc["stored"] == study.instances and doc["rejected"] == [], doc
    assert doc["safe"] == {study.uid: True}, doc


def get_into(node: NodeProc, study: Study, out: Path) -> tuple[int, dict[str, Any], str]:
    res = cli("get", study.uid, "--out", str(out), "--json", node=node.address, timeout_s=120)
    doc: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, doc, res.stderr


def restored_digests(study: Study, out: Path) -> dict[str, bytes]:
    return {f.stem: hashlib.sha256(f.read_bytes()).digest()
            for f in (out / study.uid).glob("*/*")}


def assert_get_identical(node: NodeProc, study: Study, out: Path) -> None:
    code, doc, err = get_into(node, study, out)
    assert code == 0 and doc["failed"] == [], (code, doc, err)
    assert doc["instances"] == study.instances, doc
    study.check_restored(out)


def located_safe_everywhere(node: NodeProc, study: Study) -> dict[str, Any]:
    doc = cli_json("locate", study.uid, node=node.address)
    assert doc["safe"] is True and doc["safe_copies"] == 3, doc
    assert holder_ids(doc) == {sid for sid, _ in SITES}, doc
    assert all(h["instances"] == study.instances for h in doc["holders"]), doc
    return doc


# ---- the cluster -------------------------------------------------------------------------


def three_sites(workdir: Path, *, scrub: dict[str, Any] | None = None) -> Cluster:
    c = Cluster(workdir)
    for node_id, city in SITES:
        member = c.add(node_id, city, dead_after_s=DEAD_AFTER_S)
        member.extra["scrub"] = dict(scrub or SCRUB)
    return c


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = three_sites(tmp_path / "c")
    with started(c):
        c.wait_converged()
        yield c


# ---- 1. damage on one running node: found and repaired in one pass ------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "delete-unread"])
def test_damage_found_and_repaired_in_one_pass(cluster: Cluster, tmp_path: Path,
                                               damage: str) -> None:
    """flip: one byte flipped in each of 5 random records; truncate: the pack cut inside
    a record; delete: the pack file removed after the node has read from it;
    delete-unread: removed before the node has read a byte of it. (A node holding less
    than 512 MB has one pack, the one it appends to.)"""
    boston, chicago, _ = cluster.members
    study = make_study(tmp_path / "in", 1, instances=12)
    put_safe(boston, study)
    victim = chicago
    records = all_records(victim)
    _, before = scrub_doc(victim)
    assert before["total_chunks"] == len(records), (before, len(records))
    assert before["corrupt_found"] == before["repaired"] == 0, before
    if damage != "delete-unread":  # the node serves the study before the damage
        assert_get_identical(victim, study, tmp_path / "before")

    rng = random.Random(f"scrub-{damage}")
    if damage == "flip":
        damaged = flip_random_records(records, rng, 5)
    elif damage == "truncate":
        assert len(pack_files(victim)) == 1, pack_files(victim)
        damaged = truncate_mid_record(records, rng)
    else:
        (pack,) = pack_files(victim)
        pack.unlink()
        damaged = {r.key for r in records}
    assert damaged

    # between the damage and the repair: the damaged node serves the study, every byte
    # right (damaged chunks come from a peer), or fails loudly; never wrong bytes
    assert_get_identical(victim, study, tmp_path / "between")

    started_at = time.monotonic()
    doc = scrub_pass(victim)
    print(f"{damage}: {len(damaged)} damaged chunks; pass done after "
          f"{time.monotonic() - started_at:.2f} s: {doc}")
    assert doc["corrupt_found"] - before["corrupt_found"] == len(damaged), doc
    assert doc["repaired"] - before["repaired"] == len(damaged), doc
    assert doc["unrepairable"] == [], doc
    assert doc["pass_chunks"] == doc["total_chunks"] == len(records), doc

    status = cli_json("status", node=victim.address)
    codes = alert_codes(status)
    assert "CORRUPTION_REPAIRED" in codes and "CORRUPTION_UNREPAIRABLE" not in codes, status
    alert = next(a for a in status["alerts"] if a["code"] == "CORRUPTION_REPAIRED")
    assert f"found {len(damaged)} damaged chunks and repaired {len(damaged)}" in alert[
        "message"], alert
    here = located_safe_everywhere(victim, study)
    own = next(h for h in here["holders"] if h["node"] == victim.node_id)
    assert 0 <= own["verified_age_s"] < time.monotonic() - started_at + 1, here
    wait_for(lambda: located_safe_everywhere(boston, study), VIEW_TIMEOUT_S,
             "boston to count the repaired node as a holder again")
    assert_get_identical(victim, study, tmp_path / "after")

    # the repaired copies are good: the next pass finds nothing new
    again = scrub_pass(victim)
    assert again["corrupt_found"] == doc["corrupt_found"], again
    assert again["pass_chunks"] == len(records), again


# ---- 2. every copy damaged: unrepairable, by name, never served ---------------------------


def test_every_copy_corrupt_is_unrepairable_and_never_served(cluster: Cluster,
                                                             tmp_path: Path) -> None:
    boston, chicago, denver = cluster.members
    study = make_study(tmp_path / "in", 2, instances=4)
    put_safe(boston, study)
    sop = sorted(study.by_sop)[1]
    rng = random.Random("every-copy")
    key = b""
    for member in cluster.members:  # the same chunk, damaged at every site
        rec = header_record_of(all_records(member), sop)
        key = key or rec.key
        assert rec.key == key
        flip_byte(rec.pack, rec.offset + RECORD_HEAD_LEN
                  + rng.randrange(rec.length - RECORD_HEAD_LEN))

    def get_fails_naming_the_instance(out: Path) -> None:
        code, doc, err = get_into(boston, study, out)
        assert code == 1, (code, doc, err)
        assert [f["sop_instance_uid"] for f in doc["failed"]] == [sop], doc
        assert sop in doc["failed"][0]["reason"], doc
        assert doc["instances"] == study.instances - 1, doc
        got = restored_digests(study, out)  # what was written is right; the rest is absent
        assert set(got) == set(study.by_sop) - {sop}, sorted(got)
        assert all(got[s] == study.by_sop[s] for s in got)

    get_fails_naming_the_instance(tmp_path / "before")

    for member in cluster.members:
        doc = scrub_pass(member)
        assert doc["corrupt_found"] == 1 and doc["repaired"] == 0, (member.node_id, doc)
        code, doc = scrub_doc(member)
        assert code == 1, doc
        assert doc["unrepairable"] == [f"instance {sop} of study {study.uid}"], doc

    status = cli_json("status", node=boston.address)
    alert = next((a for a in status["alerts"] if a["code"] == "CORRUPTION_UNREPAIRABLE"), None)
    assert alert is not None, status
    assert alert["severity"] == "critical" and study.uid in alert["message"], alert
    assert sop in alert["message"], alert

    # no node counts itself (or is counted) as a holder of the damaged study any more
    here = cli_json("locate", study.uid, node=boston.address)
    assert "boston" not in holder_ids(here) and here["safe"] is False, here

    def nobody_holds() -> dict[str, Any]:
        for member in (boston, chicago, denver):
            doc = cli_json("locate", study.uid, node=member.address)
            assert doc["holders"] == [] and doc["safe"] is False, (member.node_id, doc)
        return doc

    wait_for(nobody_holds, VIEW_TIMEOUT_S, "every node to stop counting any holder")
    get_fails_naming_the_instance(tmp_path / "after")
    res = cli("get", study.uid, "--out", str(tmp_path / "human"), node=boston.address)
    assert res.returncode == 1 and f"FAILED {sop}" in res.stdout, (res.stdout, res.stderr)

    # what the alert says to do works: re-sent, the instance is held and served again
    again = cli_json("put", str(study.folder), node=boston.address)
    assert (again["stored"], again["duplicates"]) == (1, study.instances - 1), again
    assert_get_identical(boston, study, tmp_path / "re-sent")


# ---- 3. a pass resumes where it stopped -----------------------------------------------------


def test_pass_resumes_after_restart(tmp_path: Path) -> None:
    """At 1 MB/s a pass over ~4 MB of records takes several seconds; SIGTERM the node
    mid-pass, restart it: the pass goes on from where it was, nothing verified twice."""
    node = NodeProc(tmp_path / "n", node_id="solo",
                    extra={"scrub": {"rate_mb_s": 1.0, "interval_s": 60.0},
                           "cluster": {"copies": 1, "gossip_interval_s": 0.2,
                                       "dead_after_s": DEAD_AFTER_S}})
    study = make_study(tmp_path / "in", 3, instances=400)
    try:
        node.start()
        put = cli_json("put", str(study.folder), node=node.address, timeout_s=120)
        assert put["stored"] == study.instances, put
        _, before = scrub_doc(node)
        assert not before["running"], before
        total = before["total_chunks"]
        assert total >= 2 * study.instances, before

        scrub_doc(node, now=True)

        def some_batches_done() -> dict[str, Any]:
            _, doc = scrub_doc(node)
            assert doc["running"] and doc["pass_chunks"] >= 128, doc
            return doc

        mid = wait_for(some_batches_done, 20, "the pass to verify a few batches", 0.1)
        assert mid["pass_chunks"] < total, ("the pass finished too soon to interrupt", mid)
        assert node.terminate() == 0
        restarted = time.monotonic()
        node.start()
        _, after = scrub_doc(node)
        print(f"stopped at {mid['pass_chunks']}/{total}; right after the restart "
              f"({time.monotonic() - restarted:.2f} s): {after['pass_chunks']}/{total}")
        assert after["running"], after
        assert after["pass_chunks"] >= mid["pass_chunks"] > 0, (mid, after)
        assert after["pass_started_age_s"] > time.monotonic() - restarted, after

        def finished() -> dict[str, Any]:
            _, doc = scrub_doc(node)
            assert not doc["running"] and doc["last_pass_completed_age_s"] >= 0, doc
            assert doc["last_pass_completed_age_s"] < time.monotonic() - restarted, doc
            return doc

        done = wait_for(finished, 30, "the resumed pass to finish", 0.3)
        assert done["pass_chunks"] == total, done
        # every chunk verified exactly once by the interrupted-and-resumed pass
        assert done["chunks_verified"] - before["chunks_verified"] == total, (before, done)
        assert done["corrupt_found"] == 0 and done["unrepairable"] == [], done
    except BaseException:
        print(node.log())
        raise
    finally:
        node.stop()


# ---- the rate limit ---------------------------------------------------------------------


def test_rate_limit_holds_over_a_pass(tmp_path: Path) -> None:
    """At rate_mb_s = 4 a pass over ~10 MB of pack records takes ~2.6 s, not much less
    and not much more (the rate counts the bytes read from the packs)."""
    rate = 4.0
    node = NodeProc(tmp_path / "n", node_id="rate",
                    extra={"scrub": {"rate_mb_s": rate, "interval_s": 60.0},
                           "cluster": {"copies": 1}})
    folder = tmp_path / "in"
    write_study(folder, StudySpec(study_index=5, instances=64, seed=5))  # 512x512 CT
    try:
        node.start()
        cli_json("put", str(folder), node=node.address, timeout_s=120)
        read = int(cli_json("status", node=node.address)["chunk_bytes"])
        ideal_s = read / 1e6 / rate
        requested = time.monotonic()
        scrub_doc(node, now=True)
        began: list[float] = []

        def completed() -> float:
            _, doc = scrub_doc(node)
            now = time.monotonic()
            if doc["running"] and not began:
                began.append(now - doc["pass_started_age_s"])
            assert not doc["running"], doc
            assert 0 <= doc["last_pass_completed_age_s"] < now - requested, doc
            return now - float(doc["last_pass_completed_age_s"])

        ended = wait_for(completed, 3 * ideal_s + 20, "the rate-limited pass", 0.2)
        assert began, "the pass was never seen running"
        seconds = ended - began[0]
        measured = read / 1e6 / seconds
        print(f"{read / 1e6:.1f} MB of records at rate_mb_s = {rate:g}: {seconds:.2f} s "
              f"(ideal {ideal_s:.2f} s), {measured:.2f} MB/s")
        assert abs(measured / rate - 1) <= 0.10, (measured, rate, seconds, ideal_s)
    finally:
        node.stop()


# ---- scrub overdue, copies not verified --------------------------------------------------


def test_overdue_scrub_and_unverified_copies_alert(tmp_path: Path) -> None:
    """A pass every 1 s at 0.01 MB/s cannot keep up: status says so twice, for the
    scrubber (SCRUB_OVERDUE) and for the copies it holds (STUDIES_NOT_VERIFIED)."""
    node = NodeProc(tmp_path / "n", node_id="slow",
                    extra={"scrub": {"rate_mb_s": 0.01, "interval_s": 1.0},
                           "cluster": {"copies": 1}})
    study = make_study(tmp_path / "in", 6, instances=4)
    try:
        node.start()
        cli_json("put", str(study.folder), node=node.address)

        def alerted() -> dict[str, Any]:
            status = cli_json("status", node=node.address)
            codes = alert_codes(status)
            assert "SCRUB_OVERDUE" in codes and "STUDIES_NOT_VERIFIED" in codes, status
            return status

        status = wait_for(alerted, 15, "overdue and not-verified alerts", 0.3)
        unverified = next(a for a in status["alerts"] if a["code"] == "STUDIES_NOT_VERIFIED")
        assert "slow" in unverified["message"], unverified
        _, doc = scrub_doc(node)
        assert doc["overdue"] is True, doc
        located = cli_json("locate", study.uid, node=node.address)
        (holder,) = located["holders"]
        assert holder["verified_age_s"] > 1.5, located
    finally:
        node.stop()


# ---- 5. disk alerts -----------------------------------------------------------------------


def test_disk_alerts_follow_used_fraction_of_capacity(tmp_path: Path) -> None:
    """A put cannot itself push a node past 85 % (admission keeps a 64 MiB reserve), so
    the node is restarted with capacity_bytes set to put its stored bytes at 50, 87, 92
    and 97 % of capacity."""
    node = NodeProc(tmp_path / "n", node_id="disk",
                    extra={"cluster": {"copies": 1, "gossip_interval_s": 0.2,
                                       "dead_after_s": DEAD_AFTER_S}})
    study = make_study(tmp_path / "in", 4, instances=150)
    bands = {"DISK_85": (0.85, 0.90), "DISK_90": (0.90, 0.95), "DISK_FULL": (0.95, 1.01)}
    severity = {"DISK_85": "warning", "DISK_90": "critical", "DISK_FULL": "critical"}
    try:
        node.start()
        cli_json("put", str(study.folder), node=node.address, timeout_s=120)
        node.terminate()
        node.start()  # used bytes settle after one restart (index pages written at start)
        used = next(n for n in cli_json("status", node=node.address)["nodes"]
                    if n["id"] == "disk")["used_bytes"]
        node.terminate()
        for fraction, want in ((0.50, None), (0.87, "DISK_85"), (0.92, "DISK_90"),
                               (0.97, "DISK_FULL")):
            node.extra["node"] = {"capacity_bytes": int(used / fraction)}
            node.start()
            status = cli_json("status", node=node.address)
            me = next(n for n in status["nodes"] if n["id"] == "disk")
            actual = me["used_bytes"] / me["capacity_bytes"]
            print(f"capacity {me['capacity_bytes']}: {actual:.3f} used, alerts "
                  f"{alert_codes(status)}")
            disk = [a for a in status["alerts"] if a["code"].startswith("DISK_")]
            if want is None:
                assert actual < 0.85 and disk == [], (actual, disk)
            else:
                low, high = bands[want]
                assert low <= actual < high, (want, actual)
                assert [a["code"] for a in disk] == [want], (actual, disk)
                assert disk[0]["severity"] == severity[want], disk
                assert f"{actual * 100:.0f} %" in disk[0]["message"], disk
            assert isinstance(status["days_until_full"], float), status
            node.terminate()
    except BaseException:
        print(node.log())
        raise
    finally:
        node.stop()


def test_schedule_survives_a_wall_clock_step_back(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the fault soak (tests/soak.py, clock jumps): a pass started while the wall
    clock ran ahead left its start time in the future, so once the clock was corrected no
    pass was due, and none overdue, until the clock caught up (a day ahead: a day without
    scrubbing, unalerted). Now a step back pulls those times back to now."""
    import asyncio

    from pacsmesh.node.scrubber import Scrubber
    from pacsmesh.node.store import Store

    store = Store(tmp_path / "data", partitions=16)
    try:
        scrubber = Scrubber(store, rate_mb_s=1000, interval_s=60)
        real = time.time()
        ahead = real + 86400.0  # a day ahead
        monkeypatch.setattr(time, "time", lambda: ahead)
        loop = asyncio.new_event_loop()
        try:
            scrubber.request_pass()
            for _ in range(10):
                loop.run_until_complete(scrubber.step())
                if scrubber.state.last_pass_completed_ms:
                    break
            assert scrubber.state.last_pass_started_ms >= (ahead - 1) * 1000
            now = [real]  # the clock is corrected
            monkeypatch.setattr(time, "time", lambda: now[0])
            loop.run_until_complete(scrubber.step())
            assert not scrubber.state.running  # within the interval: not due yet
            now[0] = real + 61  # one interval later a pass is due again, not a day later
            loop.run_until_complete(scrubber.step())
            assert scrubber.state.pass_started_ms == int((real + 61) * 1000)
            # and a pass missed after the correction shows as overdue, not as far ahead
            assert scrubber.state.last_pass_completed_ms <= (real + 61) * 1000
            assert scrubber.overdue(int((real + 61 + 91) * 1000))
        finally:
            loop.close()
    finally:
        store.close()
