"""The node's log: text or JSON lines, node and site on each, patient data on none.

State changes across a real cluster (member death, unsafe, repair, safe again,
trim) are checked on the heal/trim cluster of tests/test_cluster.py, which
already kills a node; this file checks the formats, the [log] config and, on a
real node at DEBUG, that no patient name, ID or birth date reaches the log.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
from pynetdicom import AE, _config

from pacsmesh.node import logsetup
from pacsmesh.node.config import parse
from pacsmesh.node.errors import ConfigError
from pacsmesh.node.logsetup import JsonFormatter, Tally, TextFormatter
from pacsmesh.sample import StudySpec, make_instance, study_uid, write_study
from tests.conftest import require_tool
from tests.dicomproc import dicom_node, find, tool, wait_listening
from tests.logread import read, records
from tests.nodeproc import cli, write_config

# distinctive, so a leak cannot hide behind a common word
PATIENT_NAME = "Zzyzx^Quentin"
PATIENT_ID = "PMX-98765"
BIRTH_DATE = "19410203"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SECRETS = ("zzyzx", "quentin", "pmx-98765", "98765", "19410203", "1941-02-03")


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError('bad "value"\non two lines')
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("pacsmesh.cluster.gossip", logging.INFO, __file__, 1, msg, args,
                            exc_info)
    for k, v in extra.items():
        setattr(rec, k, v)
    logsetup.IdentityFilter().filter(rec)
    return rec


def test_text_and_json_lines_carry_node_site_and_study() -> None:
    logsetup.set_identity("boston-1", "New York")
    try:
        rec = _record("member %s: %s -> %s", "seattle-1", "alive", "dead", study="1.2.3")
        text = TextFormatter().format(rec)
        assert text.endswith(" INFO boston-1@New York cluster.gossip: member seattle-1: "
                             "alive -> dead [study=1.2.3]"), text
        assert records(text) == [{"ts": text[:24], "level": "INFO", "node": "boston-1",
                                  "site": "New York", "logger": "cluster.gossip",
                                  "msg": "member seattle-1: alive -> dead", "study": "1.2.3"}]
        doc = json.loads(JsonFormatter().format(rec))
        assert doc == {"ts": text[:24], "level": "INFO", "node": "boston-1", "site": "New York",
                       "logger": "cluster.gossip", "msg": "member seattle-1: alive -> dead",
                       "study": "1.2.3"}

        # newlines and quotes in a message (a peer's text) and an exception
        tricky = _record('refusing "x"\nINFO forged line %s', "\u2028", exc=True,
                         instance="1.2.3.4")
        line = JsonFormatter().format(tricky)
        assert "\n" not in line and "\u2028" not in line
        doc = json.loads(line)
        assert doc["msg"] == 'refusing "x"\nINFO forged line \u2028'
        assert doc["instance"] == "1.2.3.4"
        assert 'ValueError: bad "value"\non two lines' in doc["exc"]
        text = TextFormatter().format(tricky)
        first, *rest = text.split("\n")
        assert first.endswith('refusing "x"\\nINFO forged line \\u2028 [instance=1.2.3.4]')
        assert rest and all(x.startswith("    ") for x in rest)  # the traceback, indented
        assert records(text)[0]["instance"] == "1.2.3.4"
    finally:
        logsetup.set_identity("", "")


def test_configure_keeps_pynetdicom_quiet_and_names_library_records() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    quiet = {n: logging.getLogger(n).level for n in logsetup.QUIET_LOGGERS}
    out = io.StringIO()
    try:
        logsetup.set_identity("n1", "Boston")
        logsetup.configure("json", "debug", stream=out)
        logging.getLogger("pynetdicom.acse").debug("PDU dump: PatientName=%s", PATIENT_NAME)
        logging.getLogger("pydicom").info("value %s", PATIENT_ID)
        logging.getLogger("grpc").info("a library line")
        import warnings
        warnings.warn_explicit("Invalid value 19410203x", UserWarning,
                               "/x/site-packages/pydicom/valuerep.py", 7)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        for n, level in quiet.items():
            logging.getLogger(n).setLevel(level)
        logsetup.set_identity("", "")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [d["logger"] for d in lines] == ["grpc", "py.warnings"], lines
    assert all(d["node"] == "n1" and d["site"] == "Boston" for d in lines)
    assert "19410203" not in out.getvalue()


def test_tally_says_at_most_once_per_interval() -> None:
    t = Tally(interval_s=10)
    assert t.take(0.0) is None
    t.add("1.2.3")
    t.add("1.2.4", items=5)
    got = t.take(100.0)
    assert got is not None and (got.count, got.first, got.items) == (2, "1.2.3", 5)
    t.add("1.2.5")
    t.add_by("n2", 3_000_000)
    assert t.take(105.0) is None  # within the interval: kept
    got = t.take(110.0)
    assert got is not None and got.count == 1 and got.sources("bytes") == "n2 (3.0 MB)"
    assert t.take(200.0) is None


@pytest.mark.parametrize(("log", "error"), [
    ({}, ""),
    ({"format": "json", "level": "DEBUG"}, ""),
    ({"format": "xml"}, "[log] format = 'xml' is not one of 'text', 'json'"),
    ({"level": "loud"}, "[log] level = 'loud' is not one of"),
    ({"level": 3}, "[log] level = 3 is not a str"),
    ({"colour": True}, "[log] has an unknown key 'colour'"),
])
def test_log_section_is_validated(tmp_path: Path, log: dict[str, object], error: str) -> None:
    raw = {"node": {"data_dir": str(tmp_path), "listen": "127.0.0.1:7400"}, "log": log}
    if not error:
        cfg = parse(raw)
        assert cfg.log.format == log.get("format", "text")
        assert cfg.log.level == str(log.get("level", "info")).lower()
        return
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    assert error in str(caught.value)


def test_check_config_accepts_and_refuses_the_log_section(tmp_path: Path) -> None:
    node = {"data_dir": str(tmp_path / "d"), "listen": "127.0.0.1:7400"}
    good = write_config(tmp_path / "good.toml", {"node": node, "log": {"format": "json"}})
    res = cli("node", "--check-config", str(good))
    assert res.returncode == 0, res.stderr
    bad = write_config(tmp_path / "bad.toml", {"node": node, "log": {"format": "yaml"}})
    res = cli("node", "--check-config", str(bad))
    assert res.returncode == 2 and "[log] format = 'yaml'" in res.stderr, res.stderr


# ---- a real node at DEBUG: no patient data in its log -----------------------------------------


def send_file_bytes(port: int, path: Path) -> int:
    """C-STORE of a file's bytes as they are (pynetdicom would re-encode a dataset, and
    storescu refuses a file cut short); the status."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSMESH")
    assert assoc.is_established
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
        assoc.release()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_patient_data_in_the_log(tmp_path: Path, fmt: str) -> None:
    """put, C-FIND by name, ID and birth date, C-STOREs of broken files, a put of a
    non-DICOM file named after the patient, ls by patient ID and get: at DEBUG, in
    both formats, not one patient name, ID or birth date in the node's output."""
    for name in ("storescu", "findscu", "echoscu"):
        require_tool(name)
    spec = StudySpec(study_index=31, instances=2, rows=16, columns=16, seed=41,
                     patient_name=PATIENT_NAME, patient_id=PATIENT_ID, birth_date=BIRTH_DATE)
    folder = tmp_path / "study"
    write_study(folder, spec)
    # a file name is no place for patient data, but it happens
    named = tmp_path / "upload" / f"{PATIENT_NAME} {PATIENT_ID} {BIRTH_DATE}.dcm"
    named.parent.mkdir()
    named.write_bytes(b"not DICOM, " + PATIENT_NAME.encode())
    node, port = dicom_node(tmp_path / "n", allowed_calling_aets=[])
    node.extra["log"] = {"format": fmt, "level": "debug"}
    node.env = {"PACSMESH_LOG": ""}  # the config's level, whatever the environment says
    node.start()
    try:
        wait_listening(port)
        assert cli("put", str(folder), node=node.address).returncode == 0
        assert cli("put", str(named), node=node.address).returncode == 1  # rejected
        for keys in ([f"PatientName={PATIENT_NAME}", f"PatientID={PATIENT_ID}",
                      f"PatientBirthDate={BIRTH_DATE}"],
                     ["PatientName=Zzyzx*", "PatientID", "PatientBirthDate=19410101-19411231"]):
            found = find(port, tmp_path / "find", "QueryRetrieveLevel=STUDY", *keys)
            assert [str(d.PatientID) for d in found] == [PATIENT_ID]
        # a dataset without its Study Instance UID, and one cut short
        broken = make_instance(spec, 1, 9)
        del broken.StudyInstanceUID
        no_study = tmp_path / f"{PATIENT_NAME}.dcm"
        broken.save_as(no_study, enforce_file_format=True)
        res = tool("storescu", "-aet", "STORESCU", "127.0.0.1", str(port), no_study)
        assert "CannotUnderstand" in res.stdout or res.returncode != 0, res.stdout
        cut = tmp_path / f"{PATIENT_ID}-cut.dcm"
        make_instance(spec, 1, 10).save_as(cut, enforce_file_format=True)
        cut.write_bytes(cut.read_bytes()[:-100])
        assert send_file_bytes(port, cut) == 0xC000
        assert cli("ls", "--patient", PATIENT_ID, node=node.address).returncode == 0
        uid = study_uid(spec)
        assert cli("get", uid, "--out", str(tmp_path / "out"), node=node.address
                   ).returncode == 0
    finally:
        node.stop()
    text = node.log_path.read_text(errors="replace")
    got = read(node.log_path)  # every line a record (JSON: parses)
    assert any(r["level"] == "DEBUG" for r in got)  # the test saw DEBUG output
    assert all(r["node"] == "n1" and r["site"] == "Boston" for r in got)
    if fmt == "json":
        assert all(line.startswith("{") for line in text.splitlines())
    assert any("C-FIND from FINDSCU" in r["msg"] for r in got)
    assert any("C-STORE" in r["msg"] and "refused" in r["msg"] for r in got)
    lowered = text.lower()
    for secret in SECRETS:
        assert secret not in lowered, (
            f"{secret!r} leaked into the log: "
            f"{[line for line in text.splitlines() if secret in line.lower()][:3]}")
