"""Character sets and PN matching, without processes: decoding at ingest against
pydicom's own charset test files, the response character set rule, PN matching,
and the re-decoding of text an older version stored as Latin-1 mojibake."""

# Cyrillic and Greek capitals that look Latin are the point here
# ruff: noqa: RUF001

from __future__ import annotations

import io
import warnings
from pathlib import Path

import lmdb
import pydicom
import pytest

from pacsmesh.node import charset
from pacsmesh.node.catalog import TEXT_CHECKS_QUEUED_KEY
from pacsmesh.node.charset_repair import CharsetRepair
from pacsmesh.node.dicom.query import Key, value_matches
from pacsmesh.node.dicom_layout import scan
from pacsmesh.node.store import Store
from tests.charsetfiles import JAPANESE, instance_bytes, store_legacy


def _named(path: Path) -> bool:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return "PatientName" in ds and "SOPInstanceUID" in ds


# pydicom's character-set samples that carry a patient name and an identity (two of
# them have neither: nothing to store or compare)
CHARSET_FILES = [p for p in sorted(
    (Path(pydicom.__file__).parent / "data" / "charset_files").glob("chr*.dcm")) if _named(p)]


@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: p.name)
def test_stored_names_decode_as_pydicom_does(path: Path) -> None:
    data = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    layout = scan(io.BytesIO(data), len(data))
    # pydicom drops a trailing empty component group (`...=王^小東=`); we keep the text
    assert layout.attrs["patient_name"].rstrip("=") == str(ds.PatientName)


def pn(key: str, value: str) -> bool:
    return value_matches(Key("PatientName", "PN", (key,)), value)


@pytest.mark.parametrize(("key", "value", "matches"), [
    ("müller^jürgen", "MÜLLER^JÜRGEN", True),  # case, beyond ASCII
    ("Mu\u0308ller^Jürgen", "Müller^Jürgen", True),  # composed or not
    ("M?ller*", "Müller^Jürgen", True),  # `?` is one character, not one byte
    ("M??ller*", "Müller^Jürgen", False),
    ("Müller^Jürgen", "Müller^Jürgen^^^", True),  # trailing empty components
    ("DOE^*", "DOE", True),  # `^*` over components the value leaves out
    ("Yamada^Tarou", JAPANESE, True),  # a one-group key: any group
    ("山田^太郎", JAPANESE, True),
    ("やまだ*", JAPANESE, True),
    ("山?^太郎", JAPANESE, True),
    ("山田", JAPANESE, False),  # no wildcard: the whole group
    ("=山田*", JAPANESE, True),  # in place: the ideographic group only
    ("山田*=", JAPANESE, False),  # ... and here the alphabetic one
    ("Yamada^Tarou=山田^次郎", JAPANESE, False),
    ("*=*=やまだ^たろう", JAPANESE, True),
    ("ΠΑΠΑΔΟΠΟΥΛΟΣ", "Παπαδοπουλος", True),  # final sigma folds to sigma
    ("stra?e", "STRAẞE", True),  # ẞ folds to ß, still one character
    ("иванов*", "Иванов^Иван", True),
    ("", "anything", True),
    ("*", "", True),
    ("ALPHA*", "", False),
])
def test_pn_matching(key: str, value: str, matches: bool) -> None:
    assert pn(key, value) is matches


def test_other_vrs_keep_exact_case() -> None:
    assert not value_matches(Key("StudyDescription", "LO", ("кт*",)), "КТ ГРУДИ")
    assert value_matches(Key("StudyDescription", "LO", ("КТ ?РУДИ",)), "КТ ГРУДИ")


@pytest.mark.parametrize(("query", "values", "answer"), [
    ((), [("PN", "DOE^JANE")], ()),  # ASCII: as asked
    (("ISO_IR 100",), [("PN", "DOE^JANE")], ("ISO_IR 100",)),
    (("ISO_IR 100",), [("PN", "Müller^Jürgen")], ("ISO_IR 100",)),
    (("ISO_IR 100",), [("PN", "Иванов")], ("ISO_IR 192",)),  # Latin-1 cannot carry it
    ((), [("PN", "Müller")], ("ISO_IR 192",)),  # the default repertoire is ASCII
    (("ISO_IR 6",), [("PN", "é")], ("ISO_IR 192",)),
    (("", "ISO 2022 IR 87"), [("PN", JAPANESE)], ("", "ISO 2022 IR 87")),
    (("ISO 2022 IR 13",), [("PN", JAPANESE)], ("ISO_IR 192",)),  # no kanji in JIS X 0201
    (("ISO_IR 144",), [("PN", "Иванов^Иван"), ("LO", "КТ")], ("ISO_IR 144",)),
    (("GB18030",), [("PN", "Wang^XiaoDong=王^小东")], ("GB18030",)),
    (("ISO_IR 144",), [("PN", "Иванов"), ("LO", "Müller")], ("ISO_IR 192",)),
])
def test_response_character_set(query: tuple[str, ...], values: list[tuple[str, str]],
                                answer: tuple[str, ...]) -> None:
    assert charset.response_terms(query, values) == answer


def test_terms_and_undecodable_bytes() -> None:
    assert charset.terms_of("\\ISO 2022 IR 87") == ("", "ISO 2022 IR 87")
    assert charset.terms_of(b"ISO_IR 100 ") == ("ISO_IR 100",)
    assert charset.terms_of("") == ()
    assert charset.decode(b"caf\xe9", ("ISO_IR 192",), "LO") == "caf\ufffd"  # never raises
    with warnings.catch_warnings():  # pydicom warns of the unknown term, once
        warnings.simplefilter("ignore")
        assert charset.decode(b"caf\xe9", ("NOT A SET",), "LO") == "café"  # the default


def test_suspects_of_the_old_latin1_decoding() -> None:
    assert charset.maybe_misdecoded("\xbf\xd5\xe2\xe0\xde\xd2")  # Cyrillic bytes as Latin-1
    assert charset.maybe_misdecoded("Yamada=\x1b$B;3ED\x1b(B")  # ISO 2022 escapes
    assert not charset.maybe_misdecoded("DOE^JANE")
    assert not charset.maybe_misdecoded("Иванов")  # beyond Latin-1: decoded right


def test_legacy_text_is_redecoded_from_the_stored_header(tmp_path: Path) -> None:
    """A data dir from before: manifests hold Latin-1 mojibake. Opened again, every
    suspect is queued; the repair reads each header and fixes the record and index."""
    cyrillic = instance_bytes(41, "Петров^Пётр", "ISO_IR 144", patient_id="ПЕТ001")
    japanese = instance_bytes(42, "Suzuki^Hanako=鈴木^花子=すずき^はなこ", "\\ISO 2022 IR 87")
    latin = instance_bytes(43, "Müller^Jürgen", "ISO_IR 100")
    data_dir = tmp_path / "data"
    store = Store(data_dir)
    try:
        legacy = [store_legacy(store, data) for data in (cyrillic, japanese, latin)]
    finally:
        store.close()
    # as a data dir written before text checks existed: nothing queued, never scanned
    env = lmdb.open(str(data_dir / "index"), max_dbs=64, subdir=True)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"text_check", txn=txn), delete=False)
        txn.delete(TEXT_CHECKS_QUEUED_KEY, db=env.open_db(b"meta", txn=txn))
    env.close()

    store = Store(data_dir)
    try:
        catalog = store.catalog
        assert catalog.text_checks_left() == 3
        rec = catalog.study_record(legacy[0].study_instance_uid)
        assert rec is not None and rec.patient_name != "Петров^Пётр"  # mojibake until fixed
        repair = CharsetRepair(store, lambda key, m: store.chunks.read(key))
        while repair._batch():
            pass
        assert catalog.text_checks_left() == 0
        names = {}
        for m in legacy:
            rec = catalog.study_record(m.study_instance_uid)
            assert rec is not None
            (fixed,) = catalog.with_text_fixes(catalog.current_manifests(m.study_instance_uid))
            assert fixed.patient_name == rec.patient_name
            names[rec.patient_name] = rec.patient_id
        assert names == {"Петров^Пётр": "ПЕТ001", "Müller^Jürgen": "PM00043",
                         "Suzuki^Hanako=鈴木^花子=すずき^はなこ": "PM00042"}
        # the patient id index moved to the decoded id
        found = catalog.scan("patient_id", "ПЕТ001".encode(), 2, lambda key: True)
        assert [uid for _, uid, _ in found][:1] == [legacy[0].study_instance_uid]
    finally:
        store.close()
