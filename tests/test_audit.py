"""The audit trail: append-only, durable across SIGKILL, paged at size, and what the
operator reads with `pacsmesh audit`; logs never carry patient data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsmesh.node.audit import DETAIL_MAX, AuditLog, Event
from pacsmesh.sample import StudySpec, study_uid, write_study
from tests.nodeproc import NodeProc, cli, cli_json


def ev(action: str = "get", study: str = "1.2.3", t: float | None = None, **kw: object
       ) -> Event:
    return Event(time=time.time() if t is None else t, who="operator:alice", role="operator",
                 address="ipv4:127.0.0.1:1", action=action, outcome="ok", study_uid=study,
                 **kw)  # type: ignore[arg-type]


def test_pages_never_skip_or_repeat_at_size(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    total = 25_000  # far more than a page (1000) and than the read cap (10000)
    for i in range(0, total, 500):  # concurrent-style: many waiting, one sync per batch
        for j in range(i, i + 499):
            log.record(ev(study=f"1.2.{j}"), wait=False)
        log.record(ev(study=f"1.2.{i + 499}"))
    seen: list[str] = []
    after = ""
    while True:
        page, after = log.read(limit=1000, after=after)
        seen += [e.study_uid for e in page]
        if not after:
            break
    assert seen == [f"1.2.{i}" for i in range(total)]
    only, _ = log.read(study_uid="1.2.777")
    assert [e.study_uid for e in only] == ["1.2.777"]
    log.close()


def test_since_filter_details_capped_and_torn_line_skipped(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    old = time.time() - 3 * 86400
    log.record(ev(study="1.1", t=old))
    log.record(ev(study="1.2", detail="x" * 10_000))
    log.close()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    with open(tmp_path / "audit" / f"{day}.jsonl", "ab") as f:
        f.write(b'{"time": 1, "who": "torn')  # a crash in the middle of a line
    log = AuditLog(tmp_path)
    log.record(ev(study="1.3"))
    events, _ = log.read()
    assert [e.study_uid for e in events] == ["1.1", "1.2", "1.3"]
    assert len(events[1].detail) <= DETAIL_MAX + 3
    recent, _ = log.read(since=time.time() - 86400)
    assert [e.study_uid for e in recent] == ["1.2", "1.3"]
    log.close()


WRITER = """
import sys, time
from pathlib import Path
from pacsmesh.node.audit import AuditLog, Event
log = AuditLog(Path(sys.argv[1]))
i = 0
while True:
    log.record(Event(time=time.time(), who="w", role="", address="", action="put",
                     outcome="ok", study_uid=f"1.9.{i}"))
    print(i, flush=True)
    i += 1
"""


def test_every_acknowledged_event_survives_sigkill(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None
    acknowledged = -1
    deadline = time.monotonic() + 30
    while acknowledged < 300 and time.monotonic() < deadline:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    events, _ = AuditLog(tmp_path).read(limit=10_000)
    got = {e.study_uid for e in events}
    assert acknowledged >= 300
    assert {f"1.9.{i}" for i in range(acknowledged + 1)} <= got


def test_cli_audit_shows_who_did_what_and_logs_carry_no_patient_data(tmp_path: Path) -> None:
    spec = StudySpec(study_index=5, instances=3, rows=64, columns=64, seed=9,
                     patient_id="PID-SECRET-4711", patient_name="SECRETNAME^PATIENT")
    write_study(tmp_path / "study", spec)
    uid = study_uid(spec)
    node = NodeProc(tmp_path, node_id="a1", env={"PACSMESH_LOG": "DEBUG"})
    try:
        node.start()
        assert cli("put", str(tmp_path / "study"), node=node.address).returncode == 0
        assert cli("get", uid, "--out", str(tmp_path / "out"), node=node.address
                   ).returncode == 0
        assert cli("ls", "--patient", "PID-SECRET-4711", node=node.address).returncode == 0
        assert cli("locate", uid, node=node.address).returncode == 0
        assert cli("get", "1.2.3.4", "--out", str(tmp_path / "x"), node=node.address
                   ).returncode == 1
        doc = cli_json("audit", "--since", "1h", node=node.address)
        actions = [(e["action"], e["outcome"], e["study_uid"], e["instances"])
                   for e in doc["events"]]
        # put sends over several streams: one event per stream and study
        assert sum(a[3] for a in actions if a[:3] == ("put", "ok", uid)) == 3
        assert ("get", "ok", uid, 3) in actions
        assert ("locate", "ok", uid, 3) in actions
        assert ("get", "failed", "1.2.3.4", 0) in actions
        assert any(a[0] == "ls" for a in actions)
        for e in doc["events"]:
            assert e["who"] == "anonymous" and e["address"].startswith("ipv4:127.0.0.1")
        only = cli_json("audit", "--study", uid, node=node.address)
        assert {e["study_uid"] for e in only["events"]} == {uid}
        bad = cli("audit", "--since", "yesterday", node=node.address)
        assert bad.returncode == 2 and "duration" in bad.stderr
    finally:
        node.stop()
    text = node.log_path.read_text()
    text += "".join(p.read_text() for p in (node.data_dir / "audit").glob("*.jsonl"))
    for secret in ("PID-SECRET-4711", "SECRETNAME", "19700101"):
        assert secret not in text, f"{secret} leaked into the logs or the audit trail"
    json.loads((next((node.data_dir / "audit").glob("*.jsonl"))).read_text().splitlines()[0])


@pytest.mark.parametrize("who", ["rita"])
def test_reader_cannot_read_the_audit(who: str) -> None:
    from pacsmesh.node.tls import roles_for
    assert "reader" not in roles_for("/pacsmesh.node.NodeApi/Audit")
    assert "operator" in roles_for("/pacsmesh.node.NodeApi/Audit")
