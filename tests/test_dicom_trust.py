"""What the DICOM listener trusts, and what it records: garbage, silent and slow
connections cannot hold association slots; DICOM TLS with client certificates;
a C-STORE whose dataset is not the instance it names is refused; every DICOM
service and refusal is in the audit trail, durable before it is acknowledged,
without patient data. Real node processes, raw sockets, dcmtk and pynetdicom."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config

from pacsmesh.node import pki
from pacsmesh.sample import StudySpec, make_instance, study_uid, write_study
from tests.conftest import require_tool
from tests.dicomproc import CommitmentScu, dicom_node, find, storescp, tool, wait_listening
from tests.nodeproc import NodeProc, cli, free_port

NEGOTIATION_TIMEOUT_S = 3.0
MAX_ASSOCIATIONS = 4
CUT_SLACK_S = 1.5  # a cut-off connection is closed this soon after its deadline
OTHER_ADDRESS = "127.0.0.2"  # loopback answers on all of 127/8: "another host"
ECHO = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECRETS = ("SECRET^ANNE", "PID-SECRET-77", "19700101")  # patient name, ID, birth date


@dataclass
class Site:
    node: NodeProc
    port: int
    viewer_port: int
    work: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for name in ("storescu", "findscu", "getscu", "movescu", "storescp", "echoscu"):
        require_tool(name)
    work = tmp_path_factory.mktemp("dicom-trust")
    viewer_port = free_port()
    node, port = dicom_node(
        work, allowed_calling_aets=["STORESCU", "ECHOSCU", "FINDSCU", "GETSCU", "MOVESCU",
                                    "MODALITY"],
        destinations={"VIEWER": f"127.0.0.1:{viewer_port}"},
        max_associations=MAX_ASSOCIATIONS, negotiation_timeout_s=NEGOTIATION_TIMEOUT_S,
        commitment_timeout_s=1.0)
    node.env = {"PACSMESH_LOG": "DEBUG"}  # the patient-data grep reads every line
    node.start()
    try:
        wait_listening(port)
        yield Site(node, port, viewer_port, work)
    finally:
        node.stop()


def audit(node: NodeProc, *tls: str) -> list[dict[str, Any]]:
    res = cli("audit", "--json", *tls, node=node.address)
    assert res.returncode == 0, res.stderr
    events: list[dict[str, Any]] = json.loads(res.stdout)["events"]
    return events


# ---- raw connections that never associate -------------------------------------------------


def raw(port: int, first: bytes = b"", source: str = OTHER_ADDRESS) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if first:
        sock.sendall(first)
    return sock


def slowloris(port: int, stop: threading.Event) -> socket.socket:
    """An A-ASSOCIATE-RQ header announcing 4 KiB, then one byte a second."""
    sock = raw(port, b"\x01\x00\x00\x00\x10\x00")

    def drip() -> None:
        while not stop.wait(1.0):
            try:
                sock.send(b"\x00")
            except OSError:
                return
    threading.Thread(target=drip, daemon=True).start()
    return sock


class Watch:
    """Notes when the node closes a connection (reads until EOF or reset)."""

    def __init__(self, sock: socket.socket) -> None:
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._read, args=(sock,), daemon=True).start()

    def _read(self, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except OSError:  # reset: closed too
            pass
        self.closed_at = time.monotonic()
        self._done.set()

    def closed_after(self, limit_s: float) -> float:
        """Seconds from open until the node closed it; inf if not within limit_s."""
        self._done.wait(max(0.0, self.opened_at + limit_s - time.monotonic()))
        return float("inf") if self.closed_at is None else self.closed_at - self.opened_at


def associate(port: int, source: str = "127.0.0.1") -> Any:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(ECHO)
    return ae.associate("127.0.0.1", port, ae_title="PACSMESH", bind_address=(source, 0))


def test_garbage_silent_and_slow_connections_cannot_hold_association_slots(
        site: Site, tmp_path: Path) -> None:
    """From one address: as many silent, half-sent and byte-a-second connections as
    there are association slots, plus HTTP and a 4 GiB association request. A
    modality at another address stores at once, every slot stays usable, and each
    bad connection is closed: garbage at once, the rest at the negotiation timeout
    (pynetdicom alone held them forever)."""
    files = write_study(tmp_path / "study", StudySpec(study_index=501, instances=2, rows=16,
                                                      columns=16))
    stop = threading.Event()
    bad = [raw(site.port), raw(site.port), raw(site.port, b"\x01"), slowloris(site.port, stop)]
    assert len(bad) == MAX_ASSOCIATIONS
    http = raw(site.port, b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n")
    huge = raw(site.port, b"\x01\x00\xff\xff\xff\xff")  # a 4 GiB A-ASSOCIATE-RQ to come
    watches = [Watch(sock) for sock in bad]
    at_once = [Watch(http), Watch(huge)]
    try:
        started = time.monotonic()
        res = tool("storescu", "-aet", "STORESCU", "127.0.0.1", str(site.port), *files)
        assert res.returncode == 0, res.stdout
        assert time.monotonic() - started < NEGOTIATION_TIMEOUT_S

        # connections still negotiating hold no association slot; max_associations
        # still bounds the associations
        held = [associate(site.port) for _ in range(MAX_ASSOCIATIONS)]
        try:
            assert all(a.is_established for a in held)
            over = tool("echoscu", "-aet", "ECHOSCU", "127.0.0.1", str(site.port))
            assert "Local Limit Exceeded" in over.stdout, over.stdout
        finally:
            for a in held:
                a.release()

        # the crowded address itself gets in: its oldest idle connection makes room
        mine = associate(site.port, OTHER_ADDRESS)
        assert mine.is_established
        mine.release()

        for watch in at_once:
            assert watch.closed_after(CUT_SLACK_S) < 1.0  # not the timeout: at once
        limit_s = NEGOTIATION_TIMEOUT_S + CUT_SLACK_S
        for watch in watches:
            assert watch.closed_after(limit_s) <= limit_s
    finally:
        stop.set()
        for sock in [*bad, http, huge]:
            sock.close()

    refused = [e for e in audit(site.node) if e["action"] == "A-ASSOCIATE"
               and e["address"].startswith(f"{OTHER_ADDRESS}:")]
    details = " | ".join(e["detail"] for e in refused)
    assert {e["outcome"] for e in refused} == {"refused"}
    assert {e["who"] for e in refused} == {"unidentified"}
    for words in ("not a DICOM association request (0x47)", "oldest cut off",
                  "announced a 4294967295-byte association request",
                  f"no association within {NEGOTIATION_TIMEOUT_S:g} s"):
        assert words in details, details


# ---- C-STORE: the dataset must be the instance the request names --------------------------


def _send_as(site: Site, path: Path) -> pydicom.Dataset:
    """C-STORE of a Part 10 file's dataset bytes under its file meta's UIDs."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")  # MR
    assoc = ae.associate("127.0.0.1", site.port, ae_title="PACSMESH")
    assert assoc.is_established
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the command names the file meta's UIDs
    try:
        answer: pydicom.Dataset = assoc.send_c_store(path)
        return answer
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
        assoc.release()


def test_store_of_a_dataset_that_is_not_the_named_instance_is_refused(
        site: Site, tmp_path: Path) -> None:
    spec = StudySpec(study_index=502, instances=1, rows=16, columns=16)
    ds = make_instance(spec, 1, 1)
    ds.preamble = b"\x00" * 128  # written as is: the file meta may lie (see below)
    claimed = generate_uid()
    other_instance = tmp_path / "other-instance.dcm"
    ds.file_meta.MediaStorageSOPInstanceUID = claimed
    ds.save_as(other_instance, enforce_file_format=False)
    answer = _send_as(site, other_instance)
    assert answer.Status == 0xA900, answer
    assert answer.ErrorComment == "dataset SOP Instance UID is not the request's"

    other_class = tmp_path / "other-class.dcm"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")  # MR; it is CT
    ds.save_as(other_class, enforce_file_format=False)
    answer = _send_as(site, other_class)
    assert answer.Status == 0xA900, answer
    assert answer.ErrorComment == "dataset SOP Class UID is not the request's"

    for sop in (ds.SOPInstanceUID, claimed):
        assert not find(site.port, tmp_path / "find", "QueryRetrieveLevel=IMAGE",
                        f"SOPInstanceUID={sop}", model="-P")
    uid = study_uid(spec)
    events = [e for e in audit(site.node) if e["study_uid"] == uid]
    assert [(e["action"], e["outcome"], e["instances"]) for e in events] == [
        ("C-STORE", "refused", 0), ("C-STORE", "refused", 0)]
    assert events[0]["detail"] == (f"dataset SOP Instance UID {ds.SOPInstanceUID} is not "
                                   f"the request's {claimed}")


# ---- the audit trail of every service -----------------------------------------------------


def test_every_dicom_service_is_audited_durably_and_without_patient_data(
        site: Site, tmp_path: Path) -> None:
    spec = StudySpec(study_index=503, instances=3, rows=16, columns=16, seed=5,
                     patient_id="PID-SECRET-77", patient_name="SECRET^ANNE")
    files = write_study(tmp_path / "study", spec)
    uid = study_uid(spec)
    res = tool("storescu", "-aet", "STORESCU", "127.0.0.1", str(site.port), *files)
    assert res.returncode == 0, res.stdout
    site.node.kill()  # acknowledged means its audit event was durable too
    site.node.start()
    wait_listening(site.port)

    rsp = find(site.port, tmp_path / "find", "QueryRetrieveLevel=STUDY", "PatientName=SECRET*",
               "StudyDate=20260101-", "PatientID", "PatientBirthDate", f"StudyInstanceUID={uid}")
    assert len(rsp) == 1
    got = tmp_path / "get"
    got.mkdir()
    res = tool("getscu", "-S", "-aet", "GETSCU", "-od", got, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(site.port))
    assert res.returncode == 0 and len(list(got.iterdir())) == 3, res.stdout
    res = tool("getscu", "-S", "-aet", "GETSCU", "-od", got, "-k", "QueryRetrieveLevel=STUDY",
               "-k", "StudyInstanceUID=1.2.3.4.5", "127.0.0.1", str(site.port))
    assert res.returncode == 0, res.stdout
    with storescp(tmp_path / "viewer", "VIEWER", site.viewer_port):
        res = tool("movescu", "-S", "-aet", "MOVESCU", "-aem", "VIEWER", "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1",
                   str(site.port))
        assert res.returncode == 0, res.stdout
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    transaction = generate_uid()
    with CommitmentScu("MODALITY") as scu:
        assert scu.request(site.port, [(CT_IMAGE_STORAGE, s) for s in sops], transaction,
                           keep_open_s=10) == 0
        scu.wait(1)
    intruder = tool("echoscu", "-aet", "INTRUDER", "127.0.0.1", str(site.port))
    assert intruder.returncode != 0

    events = audit(site.node)
    mine = [e for e in events if e["study_uid"] == uid]
    for e in events:
        if e["who"].startswith("AE:"):
            assert e["role"] == "dicom" and e["address"].startswith("127.0.0.1:"), e
    stores = [e for e in mine if e["action"] == "C-STORE"]
    assert len(stores) == 3 and {(e["who"], e["outcome"], e["instances"]) for e in stores} == {
        ("AE:STORESCU", "ok", 1)}
    assert {e["detail"] for e in stores} == set(sops)
    (query,) = [e for e in events if e["action"] == "C-FIND" and "PatientName" in e["detail"]]
    assert (query["who"], query["outcome"]) == ("AE:FINDSCU", "ok")
    assert query["detail"] == ("Study Root STUDY, matched on StudyDate,PatientName,"  # tag order
                               "StudyInstanceUID; 5 keys asked; 1 matches")
    (get,) = [e for e in mine if e["action"] == "C-GET"]
    assert (get["who"], get["outcome"], get["instances"]) == ("AE:GETSCU", "ok", 3)
    assert get["detail"] == "3 of 3 instances sent"
    assert [e["detail"] for e in events if e["action"] == "C-GET" and not e["study_uid"]
            ] == ["nothing matched"]
    (move,) = [e for e in mine if e["action"] == "C-MOVE"]
    assert (move["who"], move["outcome"], move["instances"]) == ("AE:MOVESCU", "ok", 3)
    assert move["detail"].startswith(f"to VIEWER at 127.0.0.1:{site.viewer_port}")
    (action,) = [e for e in events if e["action"] == "N-ACTION" and transaction in e["detail"]]
    assert (action["who"], action["outcome"], action["instances"]) == ("AE:MODALITY", "ok", 3)
    (report,) = [e for e in events if e["action"] == "N-EVENT-REPORT"
                 and transaction in e["detail"]]
    assert report["outcome"] == "failed" and "0 safe, 3 failed" in report["detail"]
    rejected = [e for e in events if e["who"] == "AE:INTRUDER"]
    assert [(e["action"], e["outcome"]) for e in rejected] == [("A-ASSOCIATE", "refused")]
    assert "not allowed" in rejected[0]["detail"]

    text = site.node.log_path.read_text()
    text += "".join(p.read_text() for p in (site.node.data_dir / "audit").glob("*.jsonl"))
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked into the logs or the audit trail"


# ---- DICOM TLS ------------------------------------------------------------------------------


@dataclass
class TlsSite:
    node: NodeProc
    port: int  # plaintext
    tls_port: int
    pki: Path
    other: Path  # another CA
    files: list[Path]

    def cli_tls(self) -> list[str]:
        return ["--ca", str(self.pki / "ca.pem"), "--cert", str(self.pki / "alice.pem"),
                "--key", str(self.pki / "alice.key")]


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSite]:
    for name in ("storescu", "echoscu"):
        require_tool(name)
    work = tmp_path_factory.mktemp("dicom-tls")
    d, other = work / "pki", work / "other-ca"
    pki.init_ca(d)
    pki.issue(d, "n1", "node", ["127.0.0.1"])
    for name in ("alice", "bob"):
        pki.issue(d, name, "operator")
    pki.init_ca(other)
    pki.issue(other, "eve", "operator")
    tls_port = free_port()
    node, port = dicom_node(work, tls_listen=f"127.0.0.1:{tls_port}",
                            negotiation_timeout_s=NEGOTIATION_TIMEOUT_S)
    node.extra["tls"] = {"ca_cert": str(d / "ca.pem"), "cert": str(d / "n1.pem"),
                         "key": str(d / "n1.key"), "crl": str(d / "crl.pem")}
    node.tls_client = (d / "ca.pem", d / "alice.pem", d / "alice.key")
    files = write_study(work / "study", StudySpec(study_index=504, instances=2, rows=16,
                                                  columns=16))
    node.start()
    try:
        wait_listening(port)
        yield TlsSite(node, port, tls_port, d, other, files)
    finally:
        node.stop()


def storescu_tls(site: TlsSite, *tls: str | Path) -> tuple[int, str]:
    res = tool("storescu", "-aet", "STORESCU", *tls, "+cf", site.pki / "ca.pem", "127.0.0.1",
               str(site.tls_port), *site.files)
    return res.returncode, res.stdout


def tls11_refused(port: int, pki_dir: Path) -> str:
    """A TLS 1.1 client with a good certificate: the handshake error it gets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    ctx.load_cert_chain(pki_dir / "alice.pem", pki_dir / "alice.key")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            with ctx.wrap_socket(sock):
                return ""
        except ssl.SSLError as exc:
            return str(exc)


def test_dicom_tls_needs_a_client_certificate_from_the_ca(tls_site: TlsSite) -> None:
    site, d = tls_site, tls_site.pki
    silent = raw(site.tls_port, source="127.0.0.1")  # once stalled pynetdicom's accept loop
    watch = Watch(silent)
    try:
        code, out = storescu_tls(site, "+tls", d / "alice.key", d / "alice.pem")
        assert code == 0, out
        assert time.monotonic() - watch.opened_at < NEGOTIATION_TIMEOUT_S
        for tls in (("+tla",),  # no client certificate
                    ("+tls", site.other / "eve.key", site.other / "eve.pem")):  # another CA
            code, out = storescu_tls(site, *tls)
            assert code != 0, out
        assert "PROTOCOL_VERSION" in tls11_refused(site.tls_port, d).upper()
        pki.revoke(d, "bob")  # the node re-reads the CRL within a second
        time.sleep(1.2)
        code, out = storescu_tls(site, "+tls", d / "bob.key", d / "bob.pem")
        assert code != 0, out
        plain = tool("storescu", "-aet", "STORESCU", "127.0.0.1", str(site.port), *site.files)
        assert plain.returncode == 0, plain.stdout
        limit_s = NEGOTIATION_TIMEOUT_S + CUT_SLACK_S
        assert watch.closed_after(limit_s) <= limit_s
    finally:
        silent.close()

    events = audit(site.node, *site.cli_tls())
    stores = [e for e in events if e["action"] == "C-STORE"]
    assert {e["who"] for e in stores} == {"AE:STORESCU cert:operator:alice", "AE:STORESCU"}
    assert {e["outcome"] for e in stores} == {"ok"} and len(stores) == 4
    refused = " | ".join(e["detail"] for e in events if e["action"] == "A-ASSOCIATE")
    for words in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
                  "UNSUPPORTED_PROTOCOL", "is revoked",
                  f"no TLS handshake within {NEGOTIATION_TIMEOUT_S:g} s"):
        assert words in refused, refused


def test_dicom_tls_config_is_checked(tmp_path: Path) -> None:
    from pacsmesh.node.config import parse
    from pacsmesh.node.dicom.listener import tls_context
    from pacsmesh.node.errors import ConfigError

    base: dict[str, Any] = {"node": {"data_dir": "/tmp/x", "listen": "127.0.0.1:7400"}}
    with pytest.raises(ConfigError, match="tls_listen needs a certificate"):
        parse({**base, "dicom": {"tls_listen": "127.0.0.1:2762"}})
    with pytest.raises(ConfigError, match="without \\[dicom\\] tls_listen"):
        parse({**base, "dicom": {"tls_cert": "a.pem", "tls_key": "a.key"}})
    with pytest.raises(ConfigError, match="negotiation_timeout_s"):
        parse({**base, "dicom": {"negotiation_timeout_s": 0}})
    with pytest.raises(ConfigError, match="max_pending_per_address"):
        parse({**base, "dicom": {"max_pending_per_address": 0}})
    cfg = parse({**base, "dicom": {"tls_listen": "127.0.0.1:2762", "tls_cert": "d.pem",
                                   "tls_key": "d.key", "tls_client_ca": "hospital.pem"}})
    assert (cfg.dicom.tls_cert, cfg.dicom.tls_client_ca) == ("d.pem", "hospital.pem")
    with_tls = parse({**base, "dicom": {"tls_listen": "127.0.0.1:2762"},
                      "tls": {"ca_cert": "ca.pem", "cert": "n.pem", "key": "n.key"}})
    assert (with_tls.dicom.tls_cert, with_tls.dicom.tls_key, with_tls.dicom.tls_client_ca
            ) == ("n.pem", "n.key", "ca.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="TLS certificate"):
        tls_context(junk, junk, junk)
