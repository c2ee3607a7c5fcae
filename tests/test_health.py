"""The health line: the worst alert decides, info alerts leave the cluster OK, and
reasons name what is wrong, worst first."""

from pacsmesh.node import health
from pacsmesh.proto import node_pb2


def _status(*alerts: tuple[str, str], **kw: object) -> node_pb2.StatusReply:
    st = node_pb2.StatusReply(copies=3, **kw)  # type: ignore[arg-type]
    for sev, code in alerts:
        st.alerts.add(severity=sev, code=code, message="m")
    return st


def test_levels() -> None:
    assert health.judge(_status()).line == "HEALTH_OK"
    assert health.judge(_status(("info", "CORRUPTION_REPAIRED"))).level == health.OK
    h = health.judge(_status(("warning", "SCRUB_OVERDUE"), ("warning", "SCRUB_OVERDUE")))
    assert h.level == health.WARN and h.reasons == ["scrub overdue (x2)"]
    st = _status(("warning", "DISK_85"), ("critical", "STUDIES_UNSAFE"),
                 ("critical", "NODE_DEAD"), unsafe_studies=7, oldest_unsafe_age_s=7200)
    st.nodes.add(id="seattle-1", state="dead")
    st.nodes.add(id="boston-1", state="alive")
    h = health.judge(st)
    assert h.level == health.CRITICAL
    assert h.reasons == ["1 node dead (seattle-1)",
                         "7 studies short of 3 safe copies (oldest 2.0 h)", "disk 85"]
    assert h.line.startswith("HEALTH_CRITICAL: 1 node dead")


def test_human_units() -> None:
    assert health.human_age(5) == "5 s"
    assert health.human_age(600) == "10 min"
    assert health.human_age(3 * 3600) == "3.0 h"
    assert health.human_age(3 * 86400) == "3.0 d"
    assert health.human_bytes(950) == "950 B"
    assert health.human_bytes(12_345_678) == "12.3 MB"
    assert health.human_bytes(4e12) == "4.0 TB"
    assert health.human_bytes(4e15) == "4000.0 TB"
