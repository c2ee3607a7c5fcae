"""What each peer holds, as it last told us: kept in this node's LMDB.

    peer_held  node \\0 partition(4) study uid -> held instances(8) held digest(32)
    peer_part  node \\0 partition(4) -> AdHash(32) count(8)   (the sums of the above)

In LMDB, not in dicts: a million studies times a few peers would cost gigabytes
of Python objects, API threads read it without locks (every read is a
consistent snapshot), and a restarted node knows at once who held what (its
first holdings round only re-reads partitions that changed meanwhile). A
partition is replaced whole, in one transaction, so its digest always sums
exactly what is stored for it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from pacsmesh.cluster.messages import PartDigest, StudyHeld
from pacsmesh.cluster.safety import Holding
from pacsmesh.node.catalog import DIGEST_LEN, EMPTY_DIGEST, mark_dirty
from pacsmesh.node.uids import uid_problem

SEP = b"\x00"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
ADHASH_MOD = 1 << 256
# Instances of one study a peer may say it holds: far past any real study, and small
# enough that a partition's sum of them cannot outgrow its 8 bytes.
HELD_INSTANCES_MAX = 2**32 - 1


def _storable(study: str, n: int, digest: bytes) -> bool:
    """A holding from a peer that can be kept: a valid study UID (an LMDB key of at most
    64 bytes, never empty), a bounded count, and a digest when something is held."""
    return (uid_problem(study) is None and 0 <= n <= HELD_INSTANCES_MAX
            and (n == 0 or len(digest) == DIGEST_LEN))


def _digest_sum(digests: Iterable[bytes]) -> bytes:
    return (sum(int.from_bytes(d, "big") for d in digests) % ADHASH_MOD).to_bytes(
        DIGEST_LEN, "big")


class PeerHoldings:
    def __init__(self, env: Any, partitions: int) -> None:
        self.env = env
        self.partitions = partitions
        self.held = env.open_db(b"peer_held")
        self.parts = env.open_db(b"peer_part")
        self.dirty = env.open_db(b"safety_dirty")  # node/catalog.py's: judge them again

    def partition_digests(self, peer: str) -> list[PartDigest]:
        out: list[PartDigest] = [(EMPTY_DIGEST, 0)] * self.partitions
        prefix = peer.encode() + SEP
        with self.env.begin(db=self.parts) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key, raw in cur:
                    if not key.startswith(prefix):
                        break
                    p = _U32.unpack(key[len(prefix):])[0]
                    if p < self.partitions:
                        out[p] = (bytes(raw[:DIGEST_LEN]), _U64.unpack(raw[DIGEST_LEN:])[0])
        return out

    def replace(self, peer: str, partition: int, studies: Sequence[StudyHeld]) -> set[str]:
        """Our cache of one partition of `peer` becomes `studies`; returns the studies
        whose holding changed (their safety must be judged again)."""
        prefix = peer.encode() + SEP + _U32.pack(partition)
        new = {s: (n, d) for s, n, d in studies if n > 0 and _storable(s, n, d)}
        changed: set[str] = set()
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.held)
            old: dict[str, tuple[int, bytes]] = {}
            if cur.set_range(prefix):
                for key, raw in cur:
                    if not key.startswith(prefix):
                        break
                    old[bytes(key[len(prefix):]).decode()] = (
                        _U64.unpack(raw[:8])[0], bytes(raw[8:]))
            for study, value in old.items():
                if new.get(study) != value:
                    changed.add(study)
                    if study not in new:
                        txn.delete(prefix + study.encode(), db=self.held)
            for study, (n, d) in new.items():
                if old.get(study) != (n, d):
                    changed.add(study)
                    txn.put(prefix + study.encode(), _U64.pack(n) + d, db=self.held)
            digest = _digest_sum(d for _, d in new.values())
            count = sum(n for n, _ in new.values())
            part_key = peer.encode() + SEP + _U32.pack(partition)
            if count:
                txn.put(part_key, digest + _U64.pack(count), db=self.parts)
            else:
                txn.delete(part_key, db=self.parts)
            mark_dirty(txn, self.dirty, changed)  # with the change: a crash cannot lose it
        return changed

    def apply(self, peer: str, deltas: Sequence[tuple[str, int, int, bytes]]) -> set[int]:
        """`peer` says its holding of these studies is now (held instances, digest):
        update them and their partitions' sums in one transaction; returns the
        partitions that changed. Deltas save re-reading a partition; the digest
        comparison remains the safety net for a lost or reordered one."""
        changed: set[int] = set()
        studies: list[str] = []
        with self.env.begin(write=True) as txn:
            for study, partition, n, d in deltas:
                if not _storable(study, n, d):
                    continue
                key = peer.encode() + SEP + _U32.pack(partition) + study.encode()
                raw = txn.get(key, db=self.held)
                old_n, old_d = (_U64.unpack(raw[:8])[0], bytes(raw[8:])) if raw else (
                    0, EMPTY_DIGEST)
                new_d = d if n > 0 else EMPTY_DIGEST
                if (old_n, old_d) == (n, new_d):
                    continue
                if n > 0:
                    txn.put(key, _U64.pack(n) + d, db=self.held)
                else:
                    txn.delete(key, db=self.held)
                part_key = peer.encode() + SEP + _U32.pack(partition)
                praw = txn.get(part_key, db=self.parts)
                pd, pn = (bytes(praw[:DIGEST_LEN]), _U64.unpack(praw[DIGEST_LEN:])[0]) if praw \
                    else (EMPTY_DIGEST, 0)
                total = (int.from_bytes(pd, "big") - int.from_bytes(old_d, "big")
                         + int.from_bytes(new_d, "big")) % ADHASH_MOD
                pn = pn - old_n + n
                if pn > 0:
                    txn.put(part_key, total.to_bytes(DIGEST_LEN, "big") + _U64.pack(pn),
                            db=self.parts)
                else:
                    txn.delete(part_key, db=self.parts)
                changed.add(partition)
                studies.append(study)
            mark_dirty(txn, self.dirty, studies)
        return changed

    def for_studies(self, studies: Iterable[tuple[str, int]], peers: Sequence[str]
                    ) -> dict[str, list[Holding]]:
        """(study, partition) -> what each of `peers` holds of it, in one read."""
        out: dict[str, list[Holding]] = {}
        with self.env.begin(db=self.held) as txn:
            for study, partition in studies:
                suffix = SEP + _U32.pack(partition) + study.encode()
                found = []
                for peer in peers:
                    raw = txn.get(peer.encode() + suffix)
                    if raw is not None:
                        found.append(Holding(peer, _U64.unpack(raw[:8])[0], bytes(raw[8:])))
                out[study] = found
        return out

    def for_study(self, study_uid: str, partition: int, peers: Iterable[str]) -> list[Holding]:
        suffix = SEP + _U32.pack(partition) + study_uid.encode()
        out = []
        with self.env.begin(db=self.held) as txn:
            for peer in peers:
                raw = txn.get(peer.encode() + suffix)
                if raw is not None:
                    out.append(Holding(peer, _U64.unpack(raw[:8])[0], bytes(raw[8:])))
        return out

    def studies_of(self, peer: str, after: bytes, limit: int) -> tuple[list[str], bytes]:
        """Studies `peer` holds, in key order after the key `after`; and the last key."""
        prefix = peer.encode() + SEP
        out: list[str] = []
        last = after
        with self.env.begin(db=self.held) as txn:
            cur = txn.cursor()
            if not cur.set_range(after + SEP if after else prefix):
                return out, last
            for key in cur.iternext(values=False):
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                last = bytes(key)
                out.append(bytes(key[len(prefix) + 4:]).decode())
        return out, last

    def forget(self, peer: str) -> None:
        """A node that is gone for good (its disk replaced under the same id, say)."""
        prefix = peer.encode() + SEP
        with self.env.begin(write=True) as txn:
            for db in (self.held, self.parts):
                cur = txn.cursor(db=db)
                while cur.set_range(prefix) and bytes(cur.key()).startswith(prefix):
                    cur.delete()
