"""Alerts that one node can judge about itself: disk, growth, scrub. Pure functions
over figures, so tests can drive them; each message says what to do."""

from __future__ import annotations

import collections
import time

from pacsmesh.proto import node_pb2

DISK_WARN_FRACTION = 0.85
DISK_HIGH_FRACTION = 0.90
DISK_REFUSE_REPLICAS_FRACTION = 0.95  # local ingest continues; peers place elsewhere
DAYS_UNTIL_FULL_WARN = 30.0
GROWTH_WINDOW_S = 7 * 86400.0  # the ingest rate is the growth over the last week at most
GROWTH_SAMPLES_MAX = 10_080  # one a minute for a week
GROWTH_SAMPLE_EVERY_S = 60.0
GROWTH_MIN_SPAN_S = 60.0  # fewer seconds of history say nothing about a rate


def alert(severity: str, code: str, message: str) -> node_pb2.Alert:
    return node_pb2.Alert(severity=severity, code=code, message=message)


def disk_alerts(node_id: str, used_fraction: float) -> list[node_pb2.Alert]:
    pct = f"{used_fraction * 100:.0f} %"
    if used_fraction >= DISK_REFUSE_REPLICAS_FRACTION:
        return [alert("critical", "DISK_FULL",
                      f"node {node_id} storage is {pct} used: it refuses new replicas (local "
                      "ingest goes on); add disk or capacity now")]
    if used_fraction >= DISK_HIGH_FRACTION:
        return [alert("critical", "DISK_90",
                      f"node {node_id} storage is {pct} used; add disk or capacity soon")]
    if used_fraction >= DISK_WARN_FRACTION:
        return [alert("warning", "DISK_85",
                      f"node {node_id} storage is {pct} used; plan more capacity")]
    return []


class GrowthTracker:
    """Used bytes over time, for the projection of days until full."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=GROWTH_SAMPLES_MAX)

    def add(self, used_bytes: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not self.samples or now - self.samples[-1][0] >= GROWTH_SAMPLE_EVERY_S:
            self.samples.append((now, used_bytes))
        while self.samples and now - self.samples[0][0] > GROWTH_WINDOW_S:
            self.samples.popleft()

    def bytes_per_day(self, used_bytes: int, now: float | None = None) -> float | None:
        now = time.time() if now is None else now
        if not self.samples or now - self.samples[0][0] < GROWTH_MIN_SPAN_S:
            return None
        t0, u0 = self.samples[0]
        return (used_bytes - u0) / (now - t0) * 86400.0


def days_until_full(free_bytes: int, bytes_per_day: float | None) -> float | None:
    if bytes_per_day is None or bytes_per_day <= 0:
        return None
    return free_bytes / bytes_per_day


def growth_alerts(node_id: str, days: float | None, per_day: float | None
                  ) -> list[node_pb2.Alert]:
    if days is None or per_day is None or days >= DAYS_UNTIL_FULL_WARN:
        return []
    return [alert("warning" if days > 7 else "critical", "DISK_FILLING",
                  f"node {node_id} will be full in {days:.1f} days at the recent ingest rate "
                  f"of {per_day / 1e9:.2f} GB/day; add capacity")]


def scrub_alerts(node_id: str, overdue: bool, interval_s: float, corrupt_found: int,
                 repaired: int, unrepairable: list[str]) -> list[node_pb2.Alert]:
    out = []
    if overdue:
        out.append(alert("warning", "SCRUB_OVERDUE",
                         f"node {node_id} has not completed a scrub pass within "
                         f"{interval_s / 86400:.1f} days: raise scrub.rate_mb_s or the interval"))
    if unrepairable:
        shown = "; ".join(unrepairable[:3]) + (" ..." if len(unrepairable) > 3 else "")
        out.append(alert("critical", "CORRUPTION_UNREPAIRABLE",
                         f"node {node_id} found {len(unrepairable)} damaged chunks no peer could "
                         f"repair, needed by {shown}: restore those studies from another "
                         "archive or re-send them"))
    elif corrupt_found:
        out.append(alert("info", "CORRUPTION_REPAIRED",
                         f"node {node_id} found {corrupt_found} damaged chunks and repaired "
                         f"{repaired} from peers; check its disk (SMART) if this recurs"))
    return out
