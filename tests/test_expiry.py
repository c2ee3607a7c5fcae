"""The expiry deleter and Catalog.delete_study in-process, at size: thousands of
expired studies (more than one check examines), legal holds, the expiry index
rebuilt when the policy changes, and every aggregate equal to a recount after.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from pacsmesh.node import expiry as expiry_mod
from pacsmesh.node import expiry_index
from pacsmesh.node import manifest as mf
from pacsmesh.node.catalog import ADHASH_MOD, DIGEST_LEN, digest_add, partition_of
from pacsmesh.node.errors import StudyDeleted
from pacsmesh.node.expiry import ExpiryDeleter
from pacsmesh.node.lifecycle import HOLD, LifecycleBook
from pacsmesh.node.retention import RetentionSection
from pacsmesh.node.retention_desk import RetentionDesk
from pacsmesh.node.store import Store
from tests.catalogfill import Synth, filled_data_dir, synth_studies

POLICY = RetentionSection(default_years=7, by_modality={"MG": 10}, grace_days=30,
                          delete_expired=True)


def _deletable(s: Synth, today: dt.date) -> bool:
    years = 10 if s.modality == "MG" else 7
    y, m, d = int(s.study_date[:4]), int(s.study_date[4:6]), int(s.study_date[6:])
    expires = dt.date(y + years, m, d) if (m, d) != (2, 29) else dt.date(y + years, 3, 1)
    return today >= expires + dt.timedelta(days=POLICY.grace_days)


def _run(deleter: ExpiryDeleter) -> None:
    async def drive() -> None:
        idle = 0
        while idle < 2:  # until two full sweeps delete nothing more
            before = deleter.deleted
            deleter._next = 0.0
            await deleter.step()
            if deleter._resume == b"":
                idle = idle + 1 if deleter.deleted == before else 0
    asyncio.run(drive())


def test_expired_studies_go_held_and_kept_ones_stay_aggregates_recount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expiry_index, "REBUILD_BATCH", 100)
    monkeypatch.setattr(expiry_mod, "CANDIDATES_MAX", 25)
    studies = synth_studies(4000, seed=5, not_held_every=7)
    filled_data_dir(tmp_path, studies)
    store = Store(tmp_path, retention=POLICY)  # another policy: the index is rebuilt
    today = dt.datetime.now(dt.UTC).date()
    doomed = [s for s in studies if _deletable(s, today)]
    assert len(doomed) > 4 * expiry_mod.CANDIDATES_MAX
    book = LifecycleBook(store.env)
    # the 60 first to expire (more than one check examines: the deleter must get past
    # them) and every hundredth
    by_expiry = sorted(doomed, key=lambda s: (s.study_date, s.study_uid))
    held = by_expiry[:60] + by_expiry[60::100]
    book.add([LifecycleBook.make(HOLD, s.study_uid, "litigation", "operator:test", "n1",
                                 1_700_000_000_000)[1] for s in held])
    desk = RetentionDesk(store, book, "n1")
    deleter = ExpiryDeleter(store, desk, None, check_s=0.001)
    _run(deleter)

    kept = {s.study_uid for s in studies} - {s.study_uid for s in doomed} | {
        s.study_uid for s in held}
    assert set(store.catalog.study_uids()) == kept
    assert deleter.deleted == len(doomed) - len(held)
    for s in doomed:
        assert (store.catalog.is_deleted(s.study_uid) is None) == (s in held)
    # the aggregates every periodic comparison starts from equal a recount
    digests: dict[int, int] = {}
    counts: dict[int, int] = {}
    with store.env.begin() as txn:
        for mid, raw in txn.cursor(db=store.catalog.manifests):
            m = mf.decode(bytes(raw))
            assert m.study_instance_uid in kept
            p = partition_of(m.study_instance_uid, store.catalog.partitions)
            digests[p] = (digests.get(p, 0) + int.from_bytes(
                digest_add(b"", bytes(mid)), "big")) % ADHASH_MOD
            counts[p] = counts.get(p, 0) + 1
        n_expiry = txn.stat(store.catalog.expiry.db)["entries"]
        n_held = txn.stat(store.catalog.held_studies)["entries"]
    for p, (digest, count) in enumerate(store.catalog.partition_digests()):
        assert (digest, count) == (digests.get(p, 0).to_bytes(DIGEST_LEN, "big"),
                                   counts.get(p, 0)), p
    assert store.catalog.instance_count() == len(kept)
    assert n_expiry == len(kept)
    assert n_held == sum(1 for s in studies if s.study_uid in kept and s.held)
    need = sum(n for n, _ in store.catalog.need_totals().values())
    assert need == sum(1 for s in studies if s.study_uid in kept and not s.held)
    loose, _, _ = store.refs.totals()
    assert loose == sum(1 for s in doomed if s.held and s not in held)  # one chunk each
    # a deleted study is never stored again
    gone = next(s for s in doomed if s not in held)
    from tests.catalogfill import manifest_of
    m = manifest_of(gone, b"again", 1 << 50)
    mid, raw = mf.encode(m)
    with pytest.raises(StudyDeleted):
        store.submit(mid, raw, m, held=False).result(10)
    store.close()


def test_nothing_is_deleted_with_delete_expired_off(tmp_path: Path) -> None:
    studies = synth_studies(600, seed=6)
    filled_data_dir(tmp_path, studies)
    store = Store(tmp_path, retention=RetentionSection())
    deleter = ExpiryDeleter(store, RetentionDesk(store, LifecycleBook(store.env), "n1"), None,
                            check_s=0.001)
    _run(deleter)
    assert deleter.deleted == 0 and store.catalog.study_count() == 600
    store.close()


def test_a_version_that_keeps_a_deleted_study_longer_brings_it_back(tmp_path: Path) -> None:
    """Deleted here under what this node knew; a version it never saw (an MG series,
    kept 10 years) means the study was not expired: it is stored again. Another CT
    version is refused."""
    from tests.catalogfill import manifest_of
    study = Synth(study_uid="1.2.826.0.1.3680043.10.1455.9.77.1", patient_id="P1",
                  patient_name="A^B", study_date="20180601", modality="CT", accession="A1")
    filled_data_dir(tmp_path, [study])
    store = Store(tmp_path, retention=POLICY)
    desk = RetentionDesk(store, LifecycleBook(store.env), "n1")
    deleter = ExpiryDeleter(store, desk, None, check_s=0.001)
    _run(deleter)
    assert store.catalog.is_deleted(study.study_uid) is not None
    again = manifest_of(study, b"a CT version", 2 << 40)
    again.sop_instance_uid += ".2"
    mid, raw = mf.encode(again)
    with pytest.raises(StudyDeleted):
        store.submit(mid, raw, again, held=False).result(10)
    mammo = manifest_of(study, b"an MG version", 3 << 40)
    mammo.sop_instance_uid += ".3"
    mammo.modality = "MG"
    mid, raw = mf.encode(mammo)
    assert store.submit(mid, raw, mammo, held=False).result(10) is True
    assert store.catalog.is_deleted(study.study_uid) is None
    rec = store.catalog.study_record(study.study_uid)
    assert rec is not None and desk.state(rec) == "kept"  # 2018 + 10 years
    store.close()
