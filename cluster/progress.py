"""Re-protection progress, pure: is the cluster re-creating lost copies, how fast,
and when will it be done? Fed samples of (time, unsafe studies, backlog bytes);
says "stalled" when under-replicated studies stopped decreasing for a window
while some have been unsafe longer than that window (fresh ingest that is
still replicating is not a stall)."""

from __future__ import annotations

import collections
from dataclasses import dataclass

SAMPLE_EVERY_S = 5.0
KEEP_S = 3600.0  # samples kept: rates over up to an hour


@dataclass(frozen=True, slots=True)
class Progress:
    unsafe_studies: int
    backlog_bytes: int
    studies_per_s: float  # decrease of unsafe studies (>= 0)
    bytes_per_s: float  # decrease of the backlog (>= 0)
    eta_s: float  # -1: unknown (no progress measured)
    stalled: bool


class RepairTracker:
    def __init__(self, stall_after_s: float = 300.0) -> None:
        self.stall_after_s = stall_after_s
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def add(self, now: float, unsafe: int, backlog_bytes: int) -> None:
        if self._samples and now - self._samples[-1][0] < SAMPLE_EVERY_S:
            return
        self._samples.append((now, unsafe, backlog_bytes))
        while self._samples and now - self._samples[0][0] > KEEP_S:
            self._samples.popleft()

    def progress(self, now: float, unsafe: int, backlog_bytes: int,
                 oldest_unsafe_age_s: float) -> Progress:
        window = [s for s in self._samples if now - s[0] <= max(self.stall_after_s, 60.0)]
        studies_per_s = bytes_per_s = 0.0
        if window and now - window[0][0] > 0:
            span = now - window[0][0]
            studies_per_s = max(0.0, (window[0][1] - unsafe) / span)
            bytes_per_s = max(0.0, (window[0][2] - backlog_bytes) / span)
        eta = -1.0
        if unsafe == 0 and backlog_bytes == 0:
            eta = 0.0
        elif bytes_per_s > 0 and backlog_bytes > 0:
            eta = backlog_bytes / bytes_per_s
        elif studies_per_s > 0:
            eta = unsafe / studies_per_s
        # stalled: we have watched a whole window, nothing decreased over it, and some
        # study has been unsafe for longer than the window
        stalled = False
        if unsafe > 0 and oldest_unsafe_age_s > self.stall_after_s and self._samples:
            old = [s for s in self._samples if now - s[0] >= self.stall_after_s]
            if old:
                ref = old[-1]
                stalled = unsafe >= ref[1] and backlog_bytes >= ref[2]
        return Progress(unsafe, backlog_bytes, studies_per_s, bytes_per_s, eta, stalled)
