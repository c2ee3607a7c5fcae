"""Compaction against SIGKILL, on a real node process.

Before each round a fifth of a stored study stops being held here (as a trim
does); GC reclaims it and rewrites the packs at a low rate, and the node is
SIGKILLed at a seeded random moment of that rewrite. After each restart every held instance restores
byte-identical, and the store's bookkeeping equals a recount from scratch: every
held chunk indexed and readable, holder counts, loose chunks, live bytes per pack,
pack files equal to their committed lengths. A last pass then completes and gives
the space back. Seeds: PACSMESH_GC_KILL_SEEDS="1,2,3" (default 3 moments).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from pathlib import Path

import pytest

from pacsmesh.node import manifest as mf
from pacsmesh.node.chunkstore import ChunkLocation
from pacsmesh.node.hashing import content_hash as hash_of
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.sample import StudySpec, study_uid, write_study
from tests.nodeproc import NodeProc, cli

KILL_SEEDS = tuple(int(s) for s in os.environ.get("PACSMESH_GC_KILL_SEEDS", "5,6,7").split(","))
INSTANCES = 120  # ~63 MB of CT, in 2 MiB packs
GC = {"rate_mb_s": 4.0, "interval_s": 1e9, "loose_grace_s": 0.0, "compact_below": 0.9,
      "seal_min_dead_mb": 0.0}


def _gc(node: NodeProc, now: bool = False) -> node_pb2.GcStatus:
    with node.channel() as ch:
        reply: node_pb2.GcStatus = node_pb2_grpc.NodeApiStub(ch).Gc(
            node_pb2.GcRequest(now=now), timeout=10)
        return reply


def _used(node: NodeProc) -> int:
    with node.channel() as ch:
        doc = node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=10)
    return next(n.used_bytes for n in doc.nodes if n.id == node.node_id)


def gc_pass(node: NodeProc, timeout_s: float = 120) -> node_pb2.GcStatus:
    """`gc --now`, and its status once that pass completed."""
    asked = time.monotonic()
    _gc(node, now=True)
    while time.monotonic() - asked < timeout_s:
        st = _gc(node)
        if not st.running and 0 <= st.last_pass_completed_age_s < time.monotonic() - asked:
            return st
        time.sleep(0.1)
    raise TimeoutError(f"gc pass did not finish:\n{node.log()}")


def check_bookkeeping(data_dir: Path, ctx: str) -> tuple[int, int]:
    """Open the stopped node's store and recount everything GC relies on. Returns
    (held manifests, pack bytes)."""
    store = Store(data_dir, pack_size_max=2 << 20)
    try:
        committed = store.chunks.committed_pack_lengths()
        # (an empty pack just started, by a rotation or a seal, has no committed length)
        on_disk = {no: n for no, n in store.packs.existing().items() if n or no in committed}
        assert on_disk == {no: n for no, n in committed.items() if no in on_disk}, (
            f"{ctx}: pack files differ from their committed lengths")
        assert set(committed) <= set(on_disk), f"{ctx}: committed packs missing on disk"
        indexed: dict[bytes, ChunkLocation] = {}
        with store.env.begin(db=store.chunks.db) as txn:
            for key, val in txn.cursor():
                indexed[bytes(key)] = ChunkLocation.decode(bytes(val))
        users: dict[bytes, int] = {}
        held = 0
        with store.env.begin() as txn:
            for mid in txn.cursor(db=store.catalog.held).iternext(values=False):
                m = mf.decode(bytes(txn.get(bytes(mid), db=store.catalog.manifests)))
                held += 1
                for key in {c.hash for c in m.chunks}:
                    assert key in indexed, f"{ctx}: held {m.sop_instance_uid} lost a chunk"
                    users[key] = users.get(key, 0) + 1
            got_users = {bytes(k): struct.unpack(">I", v)[0]
                         for k, v in txn.cursor(db=store.refs.users)}
            got_loose = {bytes(k) for k in txn.cursor(db=store.refs.loose).iternext(values=False)}
            retired = txn.stat(store.retired)["entries"]
        assert got_users == users, f"{ctx}: holder counts differ from a recount"
        assert got_loose == set(indexed) - set(users), f"{ctx}: loose chunks differ"
        assert retired == 0, f"{ctx}: a retired pack was not removed at open"
        live: dict[int, int] = {}
        for key, loc in indexed.items():
            live[loc.pack] = live.get(loc.pack, 0) + loc.record_len
            assert store.chunks.read(key)  # verified against its hash
        assert store.refs.live_by_pack() == live, f"{ctx}: live bytes per pack differ"
        return held, store.packs.bytes_total()
    finally:
        store.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    root = tmp_path_factory.mktemp("gc-study")
    spec = StudySpec(instances=INSTANCES, study_index=3, seed=77, air_noise=12)
    return study_uid(spec), write_study(root, spec)


def _restore(node: NodeProc, uid: str, files: list[Path], keep: set[str], out: Path,
             ctx: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    res = cli("get", uid, "--out", str(out), "--json", node=node.address, timeout_s=300)
    # the instances no longer held here (others would hold them) fail, and only those
    failed = {f["sop_instance_uid"] for f in json.loads(res.stdout)["failed"]}
    got = {p.stem: p.read_bytes() for p in (out / uid).rglob("*.dcm")}
    assert set(got) == keep, f"{ctx}: {len(got)} restored, {len(keep)} held: {res.stdout[-500:]}"
    assert not failed & keep, f"{ctx}: held instances failed to restore: {res.stdout[-500:]}"
    sources = {hash_of(p.read_bytes()) for p in files}
    for sop, data in got.items():
        assert hash_of(data) in sources, f"{ctx}: {sop} differs from what was sent"


def test_sigkill_during_compaction_loses_no_live_chunk(tmp_path: Path,
                                                       study: tuple[str, list[Path]]) -> None:
    uid, files = study
    node = NodeProc(tmp_path, extra={"gc": GC, "node": {"pack_size_mb": 2}})
    node.start()
    try:
        res = cli("put", str(files[0].parent), "--json", node=node.address)
        assert res.returncode == 0, res.stderr
        used_before = _used(node)
    finally:
        node.stop()
    held, bytes_before = check_bookkeeping(node.data_dir, "before gc")
    keep: set[str] | None = None
    rng = random.Random(1)
    for seed in KILL_SEEDS:
        ctx = f"kill seed {seed}"
        # a fifth of what is left stops being held here, as after a trim: fresh garbage
        # spread over every pack, so each round has packs to rewrite
        store = Store(node.data_dir, pack_size_max=2 << 20)
        current = [c for c in store.catalog.current_manifests(uid)
                   if store.catalog.is_held(c[0])]
        if keep is None:
            keep = {m.sop_instance_uid for _, _, m in current}
            assert len(keep) == len(files)
        dropped = rng.sample(current, len(current) // 5)
        store.unhold(sorted(mid for mid, _, _ in dropped))
        keep -= {m.sop_instance_uid for _, _, m in dropped}
        store.close()
        node.start()
        try:
            _gc(node, now=True)
            deadline = time.monotonic() + 30
            while not ((st := _gc(node)).running and st.pass_packs_total):
                assert time.monotonic() < deadline, f"{ctx}: no packs to compact"
                time.sleep(0.02)
            time.sleep(random.Random(seed).uniform(0.0, 2.0))
            assert _gc(node).running, f"{ctx}: the pass ended before the kill"
        finally:
            node.kill()
        check_bookkeeping(node.data_dir, ctx)
        node.start()
        try:
            _restore(node, uid, files, keep, tmp_path / "out", ctx)
        finally:
            node.stop()

    assert keep is not None
    node.start()
    try:
        st = gc_pass(node)
        _restore(node, uid, files, keep, tmp_path / "out", "after the last pass")
        assert st.reclaimed_bytes > 0 and st.packs_compacted > 0
        assert _used(node) < 0.75 * used_before, "status used bytes did not fall"
    finally:
        node.stop()
    held, bytes_after = check_bookkeeping(node.data_dir, "after the last pass")
    assert held == len(keep)
    # the packs shrank with what is held (partial packs aside)
    share = len(keep) / len(files)
    assert bytes_after < (share + 0.15) * bytes_before, (bytes_after, bytes_before, share)
    assert not any(p.name.endswith(".tmp") for p in (node.data_dir / "packs").iterdir())
