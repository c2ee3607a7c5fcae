"""Fuzz: manifests from peers (node/manifest.py decode and problem, and
cluster/transfer.py Replicator.accept_manifests into a real Store).

A manifest from outside either decodes and passes `problem` (then every invariant
the catalog relies on holds), or is refused with a reason; fed to a real
Replicator over a real LMDB store, garbage never raises out of accept_manifests,
never harms what is stored (every stored manifest, chunk and file reads back
byte-identical, the study aggregates still count what is there) and never breaks
the node's clock for its own next ingest.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.node import manifest as mf
from pacsmesh.node.chunking import CHUNK_PLAIN_MAX, CHUNK_SIZE, chunk_spans
from pacsmesh.node.dicom_layout import scan
from pacsmesh.node.errors import InvalidInstance
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import Prepared, prepare_local
from pacsmesh.node.store import CommitItem, Store
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto import node_pb2
from pacsmesh.sample import StudySpec, make_instance, study_uid
from tests.fuzz import fuzz, garbage, u32s, u64s

SPEC = StudySpec(study_index=61, seed=29, rows=16, columns=16, patient_id="PMFUZZ01")
OTHER = StudySpec(study_index=62, seed=29, rows=16, columns=16, patient_id="PMFUZZ02")
HLC = 1_800_000_000_000 << 16


def dicom(spec: StudySpec, instance_no: int, series_no: int = 1) -> bytes:
    buf = io.BytesIO()
    make_instance(spec, series_no, instance_no).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def manifest_of(data: bytes, hlc: int = HLC, **attrs: str) -> bytes:
    """The raw manifest a peer would announce for `data`, with some attributes changed."""
    layout = scan(io.BytesIO(data), len(data))
    layout.attrs.update(attrs)
    chunks = [(content_hash(data[o : o + n]), n)
              for o, n in chunk_spans(len(data), layout.header_len, CHUNK_SIZE)]
    return mf.encode(mf.build(layout, content_hash(data), chunks, "peer-1", hlc))[1]


BASE_FILES = [dicom(SPEC, i) for i in (1, 2, 3)]
BASE_SOP = f"{study_uid(SPEC)}.1.1"
SEEDS = [
    manifest_of(BASE_FILES[0]),                      # a version of a stored instance
    manifest_of(BASE_FILES[1], hlc=HLC + 5),
    manifest_of(dicom(OTHER, 1)),                    # an instance not held here
    manifest_of(dicom(OTHER, 2, series_no=2), hlc=1),
]
# A stored instance moved to another study or series by a newer version.
MOVED_STUDY = manifest_of(BASE_FILES[0], hlc=(2 << 62), study_instance_uid=study_uid(OTHER))
MOVED_SERIES = manifest_of(BASE_FILES[0], hlc=(2 << 62),
                           series_instance_uid=f"{study_uid(SPEC)}.9")


class Node:
    def __init__(self, store: Store, replicator: Replicator, clock: HybridClock,
                 stored: dict[bytes, bytes], files: dict[str, bytes]) -> None:
        self.store, self.replicator, self.clock = store, replicator, clock
        self.stored = stored  # manifest id -> raw, stored before any garbage
        self.files = files  # sop uid -> the file as stored

    def __repr__(self) -> str:  # a failing example prints its input, not the node
        return "Node(...)"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One real store holding a study, fed garbage by every example in turn."""
    store = Store(tmp_path_factory.mktemp("fuzz-manifests") / "node", partitions=16)
    clock = HybridClock()
    pool = ThreadPoolExecutor(2)
    state = ClusterState("n-fuzz", 16, 3, 250.0, dead_after_s=600.0)
    replicator = Replicator(store, state, Peers(), "n-fuzz", "127.0.0.1:1", clock, pool)
    stored: dict[bytes, bytes] = {}
    files: dict[str, bytes] = {}
    for data in BASE_FILES:
        p = prepare_local(store, "n-fuzz", clock, data, "base")
        assert isinstance(p, Prepared)
        assert store.submit(p.manifest_id, p.raw, p.manifest).result(30)
        stored[p.manifest_id] = p.raw
        files[p.manifest.sop_instance_uid] = data
    try:
        yield Node(store, replicator, clock, stored, files)
    finally:
        store.close()
        pool.shutdown()


def restore(store: Store, m: node_pb2.Manifest) -> bytes:
    return b"".join(store.chunks.read(c.hash) for c in m.chunks)


def assert_unharmed(node: Node) -> None:
    catalog = node.store.catalog
    for mid, raw in node.stored.items():
        got = catalog.get(mid)
        assert got is not None and got[0] == raw, "a stored manifest changed"
        assert catalog.is_held(mid)
        assert restore(node.store, got[1]) == node.files[got[1].sop_instance_uid]
    # the restore path: the current version of each stored instance is the stored one,
    # or a newer version announced for the same place (a study and series of its own)
    seen: dict[str, int] = {}
    for _, _, m in catalog.current_manifests(study_uid(SPEC)):
        seen[m.sop_instance_uid] = seen.get(m.sop_instance_uid, 0) + 1
        assert m.study_instance_uid == study_uid(SPEC)
    # (a peer may announce new instances of the study: they restore once too)
    assert set(seen.values()) == {1} and set(node.files) <= set(seen), (
        "an instance restores twice or not at all")
    for uid in catalog.study_uids():
        rec = catalog.study_record(uid)
        assert rec is not None
        sops = catalog.study_instances(uid)
        assert len({sop for _, sop in sops}) == len(sops), f"{uid}: an instance listed twice"
        assert rec.instances == len(sops) and rec.held_instances <= rec.instances, rec
    # the next local ingest still gets a version stamp a manifest can carry
    node_pb2.Manifest(received_hlc=node.clock.now())


@fuzz()
@given(garbage(SEEDS))
def test_manifest_bytes_decode_or_are_refused(raw: bytes) -> None:
    try:
        m = mf.decode(raw)
    except DecodeError:
        return
    why = mf.problem(m)
    if why is not None:
        assert isinstance(why, str) and why
        return
    # what the catalog relies on of an accepted manifest
    for uid in (m.study_instance_uid, m.series_instance_uid, m.sop_instance_uid):
        assert uid_problem(uid) is None
    assert len(m.file_hash) == 32 and all(len(c.hash) == 32 for c in m.chunks)
    assert all(0 < c.size <= CHUNK_PLAIN_MAX for c in m.chunks)
    assert sum(c.size for c in m.chunks) == m.size


def extreme_manifests() -> st.SearchStrategy[bytes]:
    """Valid manifests with fields pushed to the edges of their wire types."""
    def edit(raw: bytes, hlc: int, size: int, chunk_size: int, n: int) -> bytes:
        m = mf.decode(raw)
        m.received_hlc, m.chunk_size = hlc, chunk_size
        if n:  # chunks that add up to an extreme size
            m.size = size
            del m.chunks[:]
            m.chunks.extend(node_pb2.ChunkRef(hash=bytes(32), size=CHUNK_PLAIN_MAX)
                            for _ in range(n))
        return bytes(m.SerializeToString(deterministic=True))

    return st.builds(edit, st.sampled_from(SEEDS), u64s(), u64s(), u32s(),
                     st.sampled_from([0, 1, 2, 4096]))


@fuzz(0.5)
@given(st.lists(st.one_of(garbage(SEEDS), extreme_manifests()), max_size=6))
# (regression) a version of a stored instance in another study: the group commit took
# the old version's size from the new study's record and failed on a negative count
@example([MOVED_STUDY])
# (regression) one in another series of the same study: restored twice
@example([MOVED_SERIES])
# (regression) a stamp of 2**64 - 1: our clock moved past it, and every later local
# ingest failed, its own stamp (2**64) too large for the manifest
@example([manifest_of(BASE_FILES[2], hlc=2**64 - 1)])
def test_announced_garbage_harms_nothing_stored(node: Node, raws: list[bytes]) -> None:
    new = node.replicator.accept_manifests(raws, "fuzz")
    assert 0 <= new <= len(raws)
    assert_unharmed(node)


def test_a_refused_version_fails_alone_in_its_group_commit(tmp_path: Path) -> None:
    """Regression: a file whose SOP Instance UID is stored under another study (a C-STORE
    or `put` of it, or its manifest from a peer) failed the whole group commit with a
    ValueError, taking every honest instance of the same batch with it."""
    store = Store(tmp_path / "node", partitions=16)
    try:
        clock = HybridClock()
        first = prepare_local(store, "n", clock, BASE_FILES[0], "first")
        assert isinstance(first, Prepared)
        assert store.submit(first.manifest_id, first.raw, first.manifest).result(30)
        ds = make_instance(SPEC, 1, 1)
        ds.StudyInstanceUID = study_uid(OTHER)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        batch = [prepare_local(store, "n", clock, data, ref)
                 for data, ref in ((buf.getvalue(), "moved"), (BASE_FILES[1], "honest"))]
        items = [CommitItem(p.manifest_id, p.raw, p.manifest, Future())
                 for p in batch if isinstance(p, Prepared)]
        store._commit(items)  # one batch, as the committer would take them
        with pytest.raises(InvalidInstance, match=f"is stored in study {study_uid(SPEC)}"):
            items[0].future.result(0)
        assert items[1].future.result(0) is True
        rec = store.catalog.study_record(study_uid(SPEC))
        assert rec is not None and rec.instances == 2
        assert store.catalog.study_record(study_uid(OTHER)) is None
    finally:
        store.close()


def test_a_peer_cannot_multiply_its_words_in_our_log(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: each refused manifest of an Announce logged the sender's address as
    sent: a 1 MB address with 4,096 two-byte manifests (one 1 MB message) wrote 4 GB of
    log lines."""
    garbage_batch = [b"\x08\x02"] * 200 + [b"\xff"] * 200  # refused, and undecodable
    with caplog.at_level("WARNING"):
        assert node.replicator.accept_manifests(garbage_batch, "x" * (1 << 20)) == 0
    assert len(caplog.text) < 200 * 1024, f"{len(caplog.text) >> 20} MiB of log"
