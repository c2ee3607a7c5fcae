"""Durability of `put` against crashes and shutdowns, on real node processes.

A `put` is acknowledged only after the data is fsync'd and the index committed
(node/store.py, group commit). These tests drive the real client code
(`pacsmesh.upload.Uploader`) from the test process, so each acknowledgement is
seen as it arrives, and:

* SIGKILL the node at seeded random moments during large puts, restart it on the
  same data dir, and check that every acknowledged instance comes back
  byte-identical, that whatever else came back is byte-identical too (never a
  partial or wrong file), that no index entry points at a bad chunk, and that
  recovery cut every pack back to its committed length;
* SIGTERM the node mid-put: it exits 0, nothing acknowledged is lost, every
  instance sent in full before the signal is acknowledged (the node finishes what
  is in flight), and the client accounts for every file it was given (stored,
  duplicate or rejected with a reason);
* SIGKILL right after `pacsmesh put` returned: the acknowledgement meant durable.

Kill moments come from fixed seeds (`PACSMESH_DURABILITY_SEEDS="1,2,3"` and
`PACSMESH_DURABILITY_TERM_SEED=7` override them); every assertion message names the
seed, so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydicom import dcmread

from pacsmesh.cli import CHANNEL_OPTIONS
from pacsmesh.node import manifest as mf
from pacsmesh.node.chunkstore import ChunkLocation
from pacsmesh.node.errors import PacsmeshError
from pacsmesh.node.hashing import HASH_LEN, content_hash
from pacsmesh.node.packs import pack_name
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2
from pacsmesh.sample import StudySpec, study_uid, write_study
from pacsmesh.upload import Outcome, Uploader
from tests.nodeproc import NodeProc, cli, cli_json

INSTANCES = 200  # ~525 KB each: ~105 MB per study, a large put
# Three kill moments per suite run (each a full 105 MB put); more with
# PACSMESH_DURABILITY_SEEDS=11,23,37,41,53,... for a longer run.
KILL_SEEDS = tuple(
    int(s) for s in os.environ.get("PACSMESH_DURABILITY_SEEDS", "11,37,53").split(",")
)
TERM_SEED = int(os.environ.get("PACSMESH_DURABILITY_TERM_SEED", "7"))
KILL_AFTER_MIN_S = 0.05
PUT_TIMEOUT_S = 120.0


# ---- synthetic studies ------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    uid: str
    root: Path
    files: list[Path]
    path_of: dict[str, Path]  # SOP Instance UID -> source file
    sop_of: dict[Path, str]


def make_study(root: Path, index: int, seed: int) -> Study:
    spec = StudySpec(instances=INSTANCES, study_index=index, seed=seed)
    files = write_study(root, spec)
    sop_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert len(set(sop_of.values())) == len(files)
    return Study(study_uid(spec), root, files, {s: p for p, s in sop_of.items()}, sop_of)


@pytest.fixture(scope="session")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """One 200-instance CT study (~105 MB), made once per session."""
    return make_study(tmp_path_factory.mktemp("durability-study"), index=1, seed=901)


@pytest.fixture(scope="session")
def kill_studies(tmp_path_factory: pytest.TempPathFactory, big_study: Study) -> list[Study]:
    """The big study, then one fresh study per kill round (new pixels: a large put each)."""
    return [big_study] + [
        make_study(tmp_path_factory.mktemp(f"durability-kill-{i}"), index=10 + i, seed=902)
        for i in range(1, len(KILL_SEEDS) + 1)
    ]


# ---- driving the real client ---------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    at_s: float  # since the put started
    ref: str
    path: Path | None
    outcome: int


class RecordingUploader(Uploader):
    """The real Uploader, recording when each instance was handed to gRPC in full and
    each acknowledgement as it arrives."""

    def __init__(self, channel: grpc.Channel, started: float) -> None:
        super().__init__(channel)
        self.started = started
        self.acks: list[Ack] = []
        self.handed: dict[str, float] = {}  # client_ref -> when its last message was taken

    def _requests(self, *args: Any, **kwargs: Any) -> Iterator[node_pb2.IngestMessage]:
        ref = ""
        for msg in super()._requests(*args, **kwargs):
            kind = msg.WhichOneof("kind")
            if kind == "begin":
                ref = msg.begin.client_ref
            yield msg
            if kind == "end":  # gRPC asked for the next message: this one is on its way
                with self._lock:
                    self.handed[ref] = time.monotonic() - self.started

    def _account(self, res: node_pb2.IngestResult) -> None:
        ack = Ack(time.monotonic() - self.started, res.client_ref,
                  self.paths.get(res.client_ref), res.outcome)
        with self._lock:
            self.acks.append(ack)
        super()._account(res)

    def durable_refs(self) -> set[str]:
        with self._lock:
            return {a.ref for a in self.acks if a.outcome in (Outcome.STORED, Outcome.DUPLICATE)}

    def durable_paths(self) -> set[Path]:
        """Files the node acknowledged as held: stored now, or a duplicate of a stored one."""
        with self._lock:
            return {a.path for a in self.acks
                    if a.path is not None and a.outcome in (Outcome.STORED, Outcome.DUPLICATE)}


class PutThread(threading.Thread):
    """`Uploader.put(files)` on its own channel, in a thread."""

    def __init__(self, address: str, files: list[Path]) -> None:
        super().__init__(name="durability-put", daemon=True)
        self.files = files
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.started = time.monotonic()
        self.uploader = RecordingUploader(self.channel, self.started)
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        try:
            self.uploader.put(self.files)
        except BaseException as exc:
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self.started
            self.channel.close()

    def finish(self, ctx: str) -> None:
        self.join(PUT_TIMEOUT_S)
        assert not self.is_alive(), f"{ctx}: the put did not return after the node went away"
        assert self.error is None, f"{ctx}: Uploader.put raised {self.error!r}"

    def accounting_problem(self) -> str | None:
        """Each file given to put must be stored, a duplicate, or rejected with a reason."""
        r = self.uploader.report
        accounted = r.stored + r.duplicates + len(r.rejected)
        silent = [rj for rj in r.rejected if not rj.get("reason")]
        if accounted == len(self.files) and not silent:
            return None
        return (f"{len(self.files)} files given to put, but the report accounts for {accounted} "
                f"(stored {r.stored}, duplicates {r.duplicates}, rejected {len(r.rejected)}; "
                f"{len(silent)} rejected without a reason): "
                f"{len(self.files) - accounted} files silently lost from the report")


def wait_first_ack(put: PutThread, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not put.uploader.acks and put.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)


# ---- checking what the node holds ---------------------------------------------------------


def pack_sizes(data_dir: Path) -> dict[int, int]:
    return {int(p.stem.split("-")[1]): p.stat().st_size
            for p in (data_dir / "packs").glob("pack-*.dat")}


def log_size(node: NodeProc) -> int:
    try:
        return node.log_path.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(node: NodeProc, offset: int) -> str:
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def restore_and_compare(node: NodeProc, study: Study, out: Path, must_have: set[Path],
                        ctx: str) -> set[str]:
    """`pacsmesh get` the study; every file in must_have comes back, and every file that
    comes back is byte-identical to its source. Returns the SOP UIDs that came back."""
    if out.exists():
        shutil.rmtree(out)
    res = cli("get", study.uid, "--out", str(out), "--json", node=node.address, timeout_s=300)
    if res.returncode != 0 and "NOT_FOUND" in res.stderr and not must_have:
        return set()  # killed before anything of this study was committed
    assert res.returncode == 0, (
        f"{ctx}: get {study.uid} failed ({len(must_have)} instances acknowledged): "
        f"{res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    restored = sorted((out / study.uid).rglob("*"))
    leftovers = [p for p in restored if p.is_file() and p.suffix != ".dcm"]
    assert not leftovers, f"{ctx}: partial files left by the restore: {leftovers[:5]}"
    got: dict[str, Path] = {p.stem: p for p in restored if p.suffix == ".dcm"}
    unknown = sorted(set(got) - set(study.path_of))
    assert not unknown, f"{ctx}: restored instances that were never sent: {unknown[:5]}"
    missing = sorted(str(p) for p in must_have if study.sop_of[p] not in got)
    assert not missing, (
        f"{ctx}: {len(missing)} of {len(must_have)} acknowledged instances of {study.uid} "
        f"did not come back after the restart, e.g. {missing[:5]}")
    differ = [sop for sop, p in got.items() if p.read_bytes() != study.path_of[sop].read_bytes()]
    assert not differ, (
        f"{ctx}: {len(differ)} restored instances differ from what was sent, e.g. {differ[:5]} "
        f"({len({study.sop_of[p] for p in must_have} & set(differ))} of them acknowledged)")
    shutil.rmtree(out)
    return set(got)


@dataclass
class StoreFacts:
    chunks: int = 0
    manifests: int = 0
    sops: set[str] = field(default_factory=set)
    committed: dict[int, int] = field(default_factory=dict)


def check_store(data_dir: Path, ctx: str, at_crash: dict[int, int] | None) -> StoreFacts:
    """Open the stopped node's store in this process and check the index against the packs.

    at_crash: pack sizes right after the node died; committed bytes must all have been
    there (nothing acknowledged was lost), and whatever lay past them must be gone now.
    """
    sizes = pack_sizes(data_dir)  # before Store() runs its own recovery
    store = Store(data_dir)
    facts = StoreFacts()
    try:
        facts.committed = committed = store.chunks.committed_pack_lengths()
        for no in sorted(set(sizes) | set(committed)):
            assert sizes.get(no, 0) == committed.get(no, 0), (
                f"{ctx}: {pack_name(no)} is {sizes.get(no, 0)} bytes on disk after the "
                f"restart and a clean stop, but its committed length is {committed.get(no, 0)}")
            if at_crash is not None:
                assert at_crash.get(no, 0) >= committed.get(no, 0), (
                    f"{ctx}: {pack_name(no)} held {at_crash.get(no, 0)} bytes at the crash, "
                    f"less than its committed length {committed.get(no, 0)}")

        indexed: dict[bytes, ChunkLocation] = {}
        with store.env.begin(db=store.chunks.db) as txn:
            for key, val in txn.cursor():
                indexed[bytes(key)] = ChunkLocation.decode(bytes(val))
        bad: list[str] = []
        for key, loc in indexed.items():
            if loc.offset + loc.record_len > committed.get(loc.pack, 0):
                bad.append(f"{key.hex()[:16]}: {pack_name(loc.pack)}@{loc.offset}+"
                           f"{loc.record_len} lies past the committed length")
                continue
            try:
                plain = store.chunks.read(key)  # verifies the hash
            except PacsmeshError as exc:
                bad.append(str(exc))
                continue
            if len(plain) != loc.plain_len:
                bad.append(f"{key.hex()[:16]}: {len(plain)} bytes, index says {loc.plain_len}")
        assert not bad, f"{ctx}: {len(bad)} index entries point at bad chunks: {bad[:5]}"
        facts.chunks = len(indexed)

        dangling: list[str] = []
        manifest_ids: set[bytes] = set()
        with store.env.begin(db=store.catalog.manifests) as txn:
            for mid_raw, raw_v in txn.cursor():
                mid, raw = bytes(mid_raw), bytes(raw_v)
                manifest_ids.add(mid)
                if content_hash(raw) != mid:
                    dangling.append(f"manifest {mid.hex()[:16]} does not match its id")
                    continue
                m = mf.decode(raw)
                facts.sops.add(m.sop_instance_uid)
                lost = [r.hash.hex()[:16] for r in m.chunks if r.hash not in indexed]
                if lost:
                    dangling.append(f"{m.sop_instance_uid} names unindexed chunks {lost[:3]}")
                if sum(r.size for r in m.chunks) != m.size:
                    dangling.append(f"{m.sop_instance_uid}: chunk sizes do not add up")
        with store.env.begin() as txn:
            for key in txn.cursor(db=store.catalog.versions).iternext(values=False):
                if bytes(key[-HASH_LEN:]) not in manifest_ids:
                    dangling.append(f"version entry {bytes(key)[:40]!r} names no manifest")
            for fh, mid_raw in txn.cursor(db=store.catalog.files):
                if bytes(mid_raw) not in manifest_ids:
                    dangling.append(f"file hash {bytes(fh).hex()[:16]} names no manifest")
        assert not dangling, f"{ctx}: {len(dangling)} catalog problems: {dangling[:5]}"
        facts.manifests = len(manifest_ids)
    finally:
        store.close()
    return facts


def unlogged_repairs(at_crash: dict[int, int], committed: dict[int, int], log: str
                     ) -> list[str]:
    """Packs the restarted node cut back without saying so in its log (pack name and the
    number of bytes dropped, e.g. "pack-00000001.dat: dropped 160846 unacknowledged bytes")."""
    out = []
    for no, size in sorted(at_crash.items()):
        dropped = size - committed.get(no, 0)
        if dropped > 0 and not any(pack_name(no) in line and str(dropped) in line
                                   for line in log.splitlines()):
            out.append(f"{pack_name(no)}: {dropped} bytes")
    return out


def sops_of(study: Study, paths: set[Path]) -> set[str]:
    return {study.sop_of[p] for p in paths if p in study.sop_of}


# ---- the tests -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_large_puts_loses_no_acknowledged_instance(
        tmp_path: Path, kill_studies: list[Study]) -> None:
    node = NodeProc(tmp_path / "node")
    durable: set[Path] = set()  # every file acknowledged so far, over all rounds
    accounting: list[str] = []
    node.start()
    try:
        # Round 0: a full put, no kill; its duration sets the window for the kill moments.
        base = kill_studies[0]
        put = PutThread(node.address, base.files)
        put.start()
        put.finish("round 0 (no kill)")
        assert put.uploader.report.stored == INSTANCES, put.uploader.report.as_json()
        put_s = put.seconds
        durable |= put.uploader.durable_paths()
        print(f"\nround 0: full put of {INSTANCES} instances in {put_s:.2f} s")

        for rnd, seed in enumerate(KILL_SEEDS, start=1):
            previous, fresh = kill_studies[rnd - 1], kill_studies[rnd]
            files = previous.files + fresh.files  # finish the last round's study, then a new one
            kill_at = random.Random(seed).uniform(KILL_AFTER_MIN_S, max(put_s, 0.2))
            ctx = f"round {rnd}, seed={seed}, SIGKILL at {kill_at:.3f} s into the put"

            put = PutThread(node.address, files)
            put.start()
            time.sleep(max(0.0, kill_at - (time.monotonic() - put.started)))
            in_flight = put.is_alive()
            node.kill()
            at_crash = pack_sizes(node.data_dir)
            put.finish(ctx)
            acked = put.uploader.durable_paths()
            durable |= acked
            if problem := put.accounting_problem():
                accounting.append(f"{ctx}: {problem}")

            mark = log_size(node)
            node.start()  # same port, same data dir: recovery runs in the node process
            came_back = 0
            for study in (previous, fresh):
                came_back += len(restore_and_compare(
                    node, study, tmp_path / "restored", durable & set(study.files), ctx))
            restart_log = log_since(node, mark)
            rc = node.terminate()
            assert rc == 0, f"{ctx}: clean stop after the restart exited {rc}\n{node.log()}"

            facts = check_store(node.data_dir, ctx, at_crash)
            lacking = sorted(sops_of(base, durable) - facts.sops)
            for study in kill_studies[1:]:
                lacking += sorted(sops_of(study, durable) - facts.sops)
            assert not lacking, f"{ctx}: acknowledged instances not in the catalog: {lacking[:5]}"
            unlogged = unlogged_repairs(at_crash, facts.committed, restart_log)
            assert not unlogged, (
                f"{ctx}: the restarted node cut off unacknowledged bytes without logging it: "
                f"{unlogged}\n{restart_log[-3000:]}")
            dropped = sum(max(0, s - facts.committed.get(n, 0)) for n, s in at_crash.items())
            print(f"round {rnd}: seed={seed} kill at {kill_at:.3f} s "
                  f"({'mid-put' if in_flight else 'after the put ended'}); "
                  f"{len(acked)} acknowledged this round, last at "
                  f"{max((a.at_s for a in put.uploader.acks), default=0):.3f} s; "
                  f"{came_back} restored and byte-identical; {len(durable)} acknowledged in "
                  f"all; recovery dropped {dropped} bytes; index: {facts.chunks} chunks, "
                  f"{facts.manifests} manifests, all verified")
            node.start()

        # Finally every acknowledged instance of every study, once more.
        for study in kill_studies:
            restore_and_compare(node, study, tmp_path / "restored",
                                durable & set(study.files), "final restore")
    finally:
        node.stop()
    assert not accounting, "\n".join(accounting)


def test_sigterm_mid_put_exits_cleanly_and_loses_nothing(
        tmp_path: Path, big_study: Study) -> None:
    node = NodeProc(tmp_path / "node").start()
    rng = random.Random(TERM_SEED)
    try:
        put = PutThread(node.address, big_study.files)
        put.start()
        wait_first_ack(put)
        time.sleep(rng.uniform(0.0, 0.3))
        ctx = (f"seed={TERM_SEED}, SIGTERM after {len(put.uploader.acks)} acknowledgements, "
               f"{time.monotonic() - put.started:.3f} s into the put")
        in_flight = put.is_alive()
        term_at = time.monotonic() - put.started
        rc = node.terminate()
        assert rc == 0, f"{ctx}: SIGTERM exit code {rc}\n{node.log()}"
        assert "stopped cleanly" in node.log(), f"{ctx}\n{node.log()}"
        at_stop = pack_sizes(node.data_dir)
        put.finish(ctx)
        acked = put.uploader.durable_paths()

        node.start()
        came_back = restore_and_compare(node, big_study, tmp_path / "restored", acked, ctx)
        assert node.terminate() == 0
        facts = check_store(node.data_dir, ctx, at_stop)
        lacking = sorted(sops_of(big_study, acked) - facts.sops)
        assert not lacking, f"{ctx}: acknowledged instances not in the catalog: {lacking[:5]}"
        r = put.uploader.report
        print(f"\n{ctx} ({'mid-put' if in_flight else 'after the put ended'}): "
              f"stored {r.stored}, duplicates {r.duplicates}, rejected {len(r.rejected)}; "
              f"{len(came_back)} restored and byte-identical")
        # Graceful means the node finishes what it was given: every instance handed to
        # gRPC in full before the signal must have been acknowledged, not dropped.
        handed = {ref for ref, at in put.uploader.handed.items() if at < term_at}
        dropped = sorted(handed - put.uploader.durable_refs(), key=int)
        dropped_paths = [put.uploader.paths[d] for d in dropped]
        held = [p for p in dropped_paths if big_study.sop_of[p] in came_back]
        assert not dropped, (
            f"{ctx}: {len(dropped)} of the {len(handed)} instances sent in full before SIGTERM "
            f"were never acknowledged ({len(held)} of them are stored on the node: the "
            f"acknowledgement was lost, not the data), e.g. {[str(p) for p in dropped_paths[:3]]}"
            f"; rejected e.g. {r.rejected[:2]}")
        problem = put.accounting_problem()
        assert problem is None, f"{ctx}: {problem}; rejected e.g. {r.rejected[:2]}"
    finally:
        node.stop()


def test_sigkill_right_after_put_returns_keeps_everything(
        tmp_path: Path, big_study: Study) -> None:
    node = NodeProc(tmp_path / "node").start()
    try:
        doc = cli_json("put", str(big_study.root), node=node.address)
        node.kill()  # the acknowledgement must already have meant durable
        at_crash = pack_sizes(node.data_dir)
        assert doc["stored"] == INSTANCES and doc["rejected"] == [], doc
        node.start()
        came_back = restore_and_compare(node, big_study, tmp_path / "restored",
                                        set(big_study.files), "SIGKILL after put returned")
        assert came_back == set(big_study.path_of)
        assert node.terminate() == 0
        facts = check_store(node.data_dir, "SIGKILL after put returned", at_crash)
        # Every appended chunk belonged to an acknowledged instance: nothing to cut off.
        assert {n: s for n, s in at_crash.items() if s} == facts.committed, (at_crash, facts)
        assert facts.sops == set(big_study.path_of)
    finally:
        node.stop()
