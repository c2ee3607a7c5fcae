"""The study indexes and paged listing in-process: a real Store (LMDB, packs, group
commit) holding 25,000 studies, every answer checked against a brute-force one."""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from pydicom.dataset import Dataset

from pacsmesh.node import manifest as mf
from pacsmesh.node.catalog import Catalog
from pacsmesh.node.dicom import candidates
from pacsmesh.node.dicom.query import find, parse_keys, select_instances
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.listing import BadQuery, StudyFilter, list_page
from pacsmesh.node.store import Store
from pacsmesh.node.study_index import FORMAT_KEY, INDEXED_FIELDS, split_key
from tests.catalogfill import Synth, fill, manifest_of, synth_studies

STUDIES = 25_000


@pytest.fixture(scope="module")
def studies() -> list[Synth]:
    return synth_studies(STUDIES, seed=3, patients=2000, not_held_every=9)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, studies: list[Synth]) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("listing"))
    fill(s, studies)
    try:
        yield s
    finally:
        s.close()


def walk(catalog: Catalog, flt: StudyFilter, limit: int, examine_max: int = 0
         ) -> tuple[list[str], int]:
    """Every page by `next`: (study uids in answer order, pages)."""
    out: list[str] = []
    after, pages = "", 0
    while True:
        page = list_page(catalog, flt, after, limit, lambda rec: rec.study_uid, examine_max)
        out += page.items
        pages += 1
        assert pages < 10_000, "next does not advance"
        if not page.next:
            return out, pages
        after = page.next


def brute(studies: list[Synth], keep: Callable[[Synth], bool], by_date: bool = False
          ) -> list[str]:
    chosen = [s for s in studies if keep(s)]
    chosen.sort(key=lambda s: (s.study_date, s.study_uid) if by_date else s.study_uid)
    return [s.study_uid for s in chosen]


def test_pages_return_every_study_once_in_uid_order(store: Store, studies: list[Synth]) -> None:
    uids, pages = walk(store.catalog, StudyFilter(), 1000)
    assert uids == brute(studies, lambda s: True)
    assert pages == STUDIES // 1000  # the last full page knows it is the last


def test_each_filter_matches_brute_force(store: Store, studies: list[Synth]) -> None:
    patient = studies[17].patient_id
    cases: list[tuple[StudyFilter, Callable[[Synth], bool], bool]] = [
        (StudyFilter(patient_id=patient), lambda s: s.patient_id == patient, False),
        (StudyFilter(patient_id="NOBODY"), lambda s: False, False),
        (StudyFilter(since="20230101"), lambda s: s.study_date >= "20230101", True),
        (StudyFilter(until="20160315"), lambda s: s.study_date <= "20160315", True),
        (StudyFilter(since="20200201", until="20200229"),
         lambda s: "20200201" <= s.study_date <= "20200229", True),
        (StudyFilter(modality="MG"), lambda s: s.modality == "MG", False),
        (StudyFilter(local=True), lambda s: s.held, False),
        (StudyFilter(patient_id=patient, since="20200101", modality="CT"),
         lambda s: s.patient_id == patient and s.study_date >= "20200101"
         and s.modality == "CT", False),
        (StudyFilter(since="20190101", until="20191231", modality="MR", local=True),
         lambda s: "20190101" <= s.study_date <= "20191231" and s.modality == "MR" and s.held,
         True),
    ]
    for flt, keep, by_date in cases:
        want = brute(studies, keep, by_date)
        for limit in (37, 1000):  # small pages resume in the middle of dates and patients
            got, _ = walk(store.catalog, flt, limit)
            assert got == want, (flt, limit, len(got), len(want))


def test_unsafe_filter_asks_the_view(store: Store, studies: list[Synth]) -> None:
    """`keep` decides (the service asks the view for safe copies): pages stay exact."""
    unsafe = {s.study_uid for s in studies if int(s.study_uid.rsplit(".", 1)[1]) % 5 == 0}
    page = list_page(store.catalog, StudyFilter(modality="US"), "", 10_000,
                     lambda rec: rec.study_uid if rec.study_uid in unsafe else None)
    assert page.items == brute(studies, lambda s: s.modality == "US" and s.study_uid in unsafe)


def test_a_filter_matching_nothing_pages_instead_of_scanning(store: Store,
                                                             studies: list[Synth]) -> None:
    got, pages = walk(store.catalog, StudyFilter(modality="XA"), 1000, examine_max=5000)
    assert got == [] and pages == STUDIES // 5000
    first = list_page(store.catalog, StudyFilter(modality="XA"), "", 1000,
                      lambda rec: rec.study_uid, examine_max=5000)
    assert first.items == [] and first.next == brute(studies, lambda s: True)[4999]
    # the default bound is far above 25k: one request says "no more"
    assert list_page(store.catalog, StudyFilter(modality="XA"), "", 1000,
                     lambda rec: rec.study_uid).next == ""


def test_bad_queries_are_refused(store: Store) -> None:
    for flt, after in ((StudyFilter(since="2020"), ""), (StudyFilter(until="20200230"), ""),
                       (StudyFilter(since="20200102", until="20200101"), ""),
                       (StudyFilter(), "../x"), (StudyFilter(since="20200101"), "1.2.3.4")):
        with pytest.raises(BadQuery):
            list_page(store.catalog, flt, after, 10, lambda rec: rec)


def test_limit_is_capped(store: Store) -> None:
    page = list_page(store.catalog, StudyFilter(), "", 1_000_000, lambda rec: rec.study_uid)
    assert len(page.items) == 10_000 and page.next == page.items[-1]
    assert len(list_page(store.catalog, StudyFilter(), "", 0, lambda rec: rec).items) == 1000


def index_entries(catalog: Catalog) -> dict[str, set[tuple[bytes, str]]]:
    out = {}
    with catalog.env.begin() as txn:
        for name, db in catalog.indexes.dbs.items():
            out[name] = {split_key(bytes(k)) for k in txn.cursor(db=db).iternext(values=False)}
    return out


def expected_entries(studies: list[Synth]) -> dict[str, set[tuple[bytes, str]]]:
    return {
        "patient_id": {(s.patient_id.encode(), s.study_uid) for s in studies},
        "study_date": {(s.study_date.encode(), s.study_uid) for s in studies},
        "accession_number": {(s.accession.encode(), s.study_uid) for s in studies},
    }


def test_a_corrected_patient_id_moves_the_index_key(tmp_path: Path) -> None:
    (s,) = synth_studies(1, seed=8)
    store = Store(tmp_path)
    try:
        fill(store, [s])
        fixed = Synth(s.study_uid, "PX-FIXED", s.patient_name, "20240229", s.modality,
                      s.accession)
        data = f"pacsmesh test instance of study {s.study_uid}, corrected".encode()
        store.chunks.put(content_hash(data), len(data), data, 0)
        m = manifest_of(fixed, data, hlc=(1 << 41))  # newer: the current version
        assert store.submit(*mf.encode(m), m).result(10)
        assert index_entries(store.catalog) == expected_entries([fixed])
        assert list_page(store.catalog, StudyFilter(patient_id=s.patient_id), "", 10,
                         lambda rec: rec).items == []
        (rec,) = list_page(store.catalog, StudyFilter(patient_id="PX-FIXED"), "", 10,
                           lambda rec: rec).items
        assert rec.study_date == "20240229"
    finally:
        store.close()


def strip_indexes(data_dir: Path) -> None:
    """Make a data dir look as one from before the indexes existed (format 1)."""
    env = lmdb.open(str(data_dir / "index"), max_dbs=64, subdir=True)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            for name in INDEXED_FIELDS.values():
                txn.drop(env.open_db(name, txn=txn), delete=True)
            assert txn.delete(FORMAT_KEY, db=meta)
    finally:
        env.close()


def test_indexes_are_built_for_an_older_data_dir(tmp_path: Path) -> None:
    studies = synth_studies(12_000, seed=5, patients=300)
    store = Store(tmp_path)
    fill(store, studies)
    store.close()
    strip_indexes(tmp_path)
    env = lmdb.open(str(tmp_path / "index"), max_dbs=64, subdir=True)
    with env.begin() as txn:
        assert txn.get(b"by_patient") is None  # no such db any more
    env.close()
    store = Store(tmp_path)  # indexes in batches of 10,000 at open
    try:
        assert index_entries(store.catalog) == expected_entries(studies)
        patient = studies[0].patient_id
        got, _ = walk(store.catalog, StudyFilter(patient_id=patient), 1000)
        assert got == brute(studies, lambda s: s.patient_id == patient)
    finally:
        store.close()


def test_sampled_studies_exist_and_spread(store: Store, studies: list[Synth]) -> None:
    uids = {s.study_uid for s in studies}
    rng = random.Random(4)
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(50):
        sample = store.catalog.sample_study_uids(100, rng)
        assert len(sample) == len(set(sample)) and set(sample) <= uids
        counts.update(sample)
    assert len(counts) > 4000  # ~4900 distinct of 5000 draws when uniform
    assert max(counts.values()) <= 5


# ---- C-FIND / C-GET / C-MOVE selection through the indexes ------------------------------


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows each `Catalog.scan` call read, to prove a key used its index."""
    calls: list[int] = []
    real = Catalog.scan

    def counting(self: Catalog, *args: Any, **kwargs: Any) -> Any:
        rows = real(self, *args, **kwargs)
        calls.append(len(rows))
        return rows

    monkeypatch.setattr(Catalog, "scan", counting)
    return calls


def study_uids(catalog: Catalog, **keys: str) -> list[str]:
    level, parsed = parse_keys(identifier("STUDY", **keys))
    return sorted(row.study_uid for row in find(catalog, level, parsed))


def test_find_keys_read_their_index(store: Store, studies: list[Synth],
                                    scanned: list[int]) -> None:
    s = studies[123]
    assert study_uids(store.catalog, PatientID=s.patient_id) == brute(
        studies, lambda x: x.patient_id == s.patient_id)
    assert sum(scanned) < 50
    scanned.clear()
    assert study_uids(store.catalog, AccessionNumber=s.accession) == [s.study_uid]
    assert sum(scanned) == 1
    scanned.clear()
    assert study_uids(store.catalog, StudyDate="20210301-20210310", ModalitiesInStudy="CT") == (
        brute(studies, lambda x: "20210301" <= x.study_date <= "20210310"
              and x.modality == "CT"))
    assert sum(scanned) < 200
    scanned.clear()
    assert study_uids(store.catalog, StudyDate=s.study_date,
                      PatientName=s.patient_name) == brute(
        studies, lambda x: x.study_date == s.study_date and x.patient_name == s.patient_name)
    assert sum(scanned) < 50
    scanned.clear()
    prefix = s.patient_id[:-1] + "*"
    assert study_uids(store.catalog, PatientID=prefix) == brute(
        studies, lambda x: x.patient_id.startswith(s.patient_id[:-1]))
    assert sum(scanned) < 200


def test_patient_name_wildcards_scan_up_to_the_bound(store: Store, studies: list[Synth],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    name = studies[5].patient_name
    pattern = name[:-2].lower() + "*"  # PN: wildcards, any case
    want = brute(studies, lambda x: x.patient_name.startswith(name[:-2]))
    assert study_uids(store.catalog, PatientName=pattern) == want
    monkeypatch.setattr(candidates, "STUDIES_EXAMINED_MAX", 3000)
    first_3000 = set(brute(studies, lambda x: True)[:3000])
    got = study_uids(store.catalog, PatientName=pattern)
    assert got == [u for u in want if u in first_3000]
    assert "stopped after examining 3000 studies" in caplog.text


def test_retrieve_selection_by_patient_and_accession(store: Store, studies: list[Synth]) -> None:
    s = studies[4567]
    by_patient = select_instances(store.catalog, identifier("PATIENT", PatientID=s.patient_id))
    assert sorted(m.study_instance_uid for m in by_patient) == brute(
        studies, lambda x: x.patient_id == s.patient_id)
    (m,) = select_instances(store.catalog, identifier("STUDY", AccessionNumber=s.accession))
    assert m.sop_instance_uid == f"{s.study_uid}.1.1"


def test_unsafe_alone_reads_the_unsafe_index_oldest_first(tmp_path: Path) -> None:
    """Safety verdicts (kept by the cluster) put studies in and out of the unsafe
    index; `--unsafe` alone pages through it, oldest first, and looks at no safe one."""
    few = synth_studies(12_000, seed=5, patients=100)
    s = Store(tmp_path / "d")
    try:
        fill(s, few)
        unsafe = {x.study_uid for i, x in enumerate(few) if i % 13 == 0}
        s.catalog.set_safety((x.study_uid, 0 if x.study_uid in unsafe else 3,
                              x.study_uid in unsafe) for x in few)
        assert s.catalog.safety_counts()[1] == len(unsafe)
        seen: list[str] = []

        def keep(rec: Any) -> str:
            seen.append(rec.study_uid)
            return str(rec.study_uid)

        got, pages = walk(s.catalog, StudyFilter(unsafe=True), 100)
        order = sorted(unsafe, key=lambda u: (s.catalog.study_record(u).first_received_ms, u))  # type: ignore[union-attr]
        assert got == order and pages == -(-len(unsafe) // 100)
        list_page(s.catalog, StudyFilter(unsafe=True), "", 10_000, keep)
        assert set(seen) == unsafe  # no safe study was even read
    finally:
        s.close()
