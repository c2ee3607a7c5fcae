"""The one-line verdict an operator reads first: HEALTH_OK, HEALTH_WARN or
HEALTH_CRITICAL, and why. Pure over a StatusReply, so `pacsmesh status`, the
status page and the tests judge a cluster the same way.

The level is the worst alert in force: a critical alert (a dead node, studies
unsafe for long, a disk about to fill, a failed drill) needs someone now; a
warning needs someone this week; info alerts (corruption found and repaired)
are reported but leave the cluster OK.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacsmesh.proto import node_pb2

OK = "HEALTH_OK"
WARN = "HEALTH_WARN"
CRITICAL = "HEALTH_CRITICAL"
_RANK = {"critical": 2, "warning": 1}
_LEVELS = (OK, WARN, CRITICAL)


@dataclass(frozen=True)
class Health:
    level: str             # OK | WARN | CRITICAL
    reasons: list[str]     # short, worst first; empty when OK

    @property
    def line(self) -> str:
        return self.level + (": " + "; ".join(self.reasons) if self.reasons else "")


def judge(st: node_pb2.StatusReply) -> Health:
    """The health line of a cluster as one node sees it."""
    worst = 0
    by_code: dict[str, tuple[int, int]] = {}  # code -> (rank, count)
    for a in st.alerts:
        rank = _RANK.get(a.severity, 0)
        if rank == 0:
            continue
        worst = max(worst, rank)
        r, n = by_code.get(a.code, (rank, 0))
        by_code[a.code] = (max(r, rank), n + 1)
    reasons = [_reason(code, n, st) for code, (_, n) in
               sorted(by_code.items(), key=lambda kv: (-kv[1][0], kv[0]))]
    return Health(_LEVELS[worst], reasons)


def _reason(code: str, count: int, st: node_pb2.StatusReply) -> str:
    if code == "STUDIES_UNSAFE":
        return (f"{st.unsafe_studies} studies short of {st.copies} safe copies "
                f"(oldest {human_age(st.oldest_unsafe_age_s)})")
    if code == "NODE_DEAD":
        dead = [n.id for n in st.nodes if n.state == "dead"]
        return f"{len(dead) or count} node{'s' if (len(dead) or count) != 1 else ''} dead" + (
            f" ({', '.join(dead)})" if dead else "")
    name = code.lower().replace("_", " ")
    return name if count == 1 else f"{name} (x{count})"


def human_age(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h', '2.0 d': the unit an operator would say."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def human_bytes(n: float) -> str:
    """Decimal units, as disks are sold: '950 B', '12.3 MB', '4.0 TB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
