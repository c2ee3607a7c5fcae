"""Restore drills: restore random studies from other sites and verify every byte.

A drill does what a disaster recovery would: it pulls every current instance of
a study from another node over the peer API and checks each chunk's hash and
each whole file's hash against the manifests. Nothing is written: the point is
to prove the copy restores, and how fast (time per GB). A failed drill is an
alert in status, not a log line. Results are kept (the last DRILL_RESULTS_KEPT)
in the node's catalog so they survive a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from typing import Any

import grpc

from pacsmesh.cluster.membership import Member
from pacsmesh.cluster.peers import CHUNK_BATCH_BYTES_MAX, RPC_TIMEOUT_S
from pacsmesh.cluster.safety import assess
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.node import codec
from pacsmesh.node.errors import ChunkCorrupt
from pacsmesh.node.hashing import FileHasher, content_hash
from pacsmesh.node.service import DRILL_COUNT_MAX
from pacsmesh.node.worker import Worker, WorkerState
from pacsmesh.proto import node_pb2, peer_pb2

LOGGER = logging.getLogger(__name__)
DRILL_RESULTS_KEPT = 50
DRILL_TIMEOUT_S = 600.0  # one study; a restore slower than this is a failed drill
_RESULTS_KEY = b"drill_results"
# up to this many studies, drills choose among all of them (a walk this short is cheap)
DRILL_WALK_STUDIES_MAX = 2000
# past it, this many random studies per study drilled: most are held in full elsewhere
DRILL_SAMPLE_FACTOR = 8
_RNG = random.Random()


class Drills:
    def __init__(self, r: Replicator) -> None:
        self.r = r
        self.results: list[node_pb2.DrillResult] = self._load()

    def _load(self) -> list[node_pb2.DrillResult]:
        with self.r.store.env.begin(db=self.r.store.catalog.meta) as txn:
            raw = txn.get(_RESULTS_KEY)
        if raw is None:
            return []
        out = []
        for doc in json.loads(bytes(raw)):
            out.append(node_pb2.DrillResult(**doc))
        return out

    def _save(self) -> None:
        from google.protobuf.json_format import MessageToDict

        docs = [MessageToDict(r, preserving_proto_field_name=True) for r in self.results]
        for d in docs:
            for k in ("instances", "bytes"):
                if k in d:
                    d[k] = int(d[k])
        with self.r.store.env.begin(write=True, db=self.r.store.catalog.meta) as txn:
            txn.put(_RESULTS_KEY, json.dumps(docs).encode())

    def last(self) -> list[node_pb2.DrillResult]:
        """The results of the most recent drill (same `at_s`)."""
        if not self.results:
            return []
        at = self.results[-1].at_s
        return [r for r in self.results if r.at_s == at]

    async def run(self, count: int) -> list[node_pb2.DrillResult]:
        r = self.r
        candidates = await r._run(self._candidates, count)
        picked = random.sample(candidates, min(count, len(candidates)))
        at = time.time()
        results = []
        for study, node_id, site, address in picked:
            res = await r._run(self._drill_one, study, node_id, site, address)
            res.at_s = at
            results.append(res)
            level = logging.INFO if res.ok else logging.ERROR
            LOGGER.log(level, "drill: study %s from %s (%s): %s", study, node_id, site,
                       f"{res.bytes / 1e6:.1f} MB in {res.seconds:.2f} s" if res.ok else res.error,
                       extra={"study": study})
        if not picked:
            results.append(node_pb2.DrillResult(
                ok=False, at_s=at, error="no study has a verified copy on another alive node"))
        self.results = (self.results + results)[-DRILL_RESULTS_KEPT:]
        await r._run(self._save)
        return results

    def _candidates(self, count: int) -> list[tuple[str, str, str, str]]:
        """(study, holder id, site, address) for studies some other alive node holds in
        full: every study of a small catalog, else a random sample of about
        DRILL_SAMPLE_FACTOR * count studies (never a walk of a large catalog)."""
        r = self.r
        snap = r.state.snapshot
        positions = snap.positions()
        alive: dict[str, Member] = {m.node_id: m for m in snap.alive_peers(r.node_id)}
        catalog = r.store.catalog
        if catalog.study_count() <= DRILL_WALK_STUDIES_MAX:
            uids = list(itertools.islice(catalog.study_uids(), DRILL_WALK_STUDIES_MAX))
        else:
            uids = catalog.sample_study_uids(min(count, DRILL_COUNT_MAX) * DRILL_SAMPLE_FACTOR,
                                             _RNG)
        out = []
        for uid in uids:
            rec = catalog.study_record(uid)
            if rec is None:
                continue
            holdings = [h for h in r.holdings_for(rec.study_uid) if h.node_id in alive]
            verdict = assess(rec.instances, rec.current_digest, holdings, positions,
                             r.state.min_distance_miles)
            if verdict.full_holders:
                node_id = random.choice(verdict.full_holders)
                m = alive[node_id]
                out.append((rec.study_uid, node_id, m.site, m.address))
        return out

    def _drill_one(self, study: str, node_id: str, site: str, address: str
                   ) -> node_pb2.DrillResult:
        res = node_pb2.DrillResult(study_uid=study, source_node=node_id, source_site=site)
        current = self.r.store.catalog.current_manifests(study)
        started = time.monotonic()
        try:
            stub = self.r.peers.blocking_stub(address)
            for _, _, m in current:
                self._restore_instance(stub, m)
                res.instances += 1
                res.bytes += m.size
                if time.monotonic() - started > DRILL_TIMEOUT_S:
                    raise TimeoutError(f"slower than {DRILL_TIMEOUT_S:.0f} s")
            res.ok = True
        except (grpc.RpcError, ChunkCorrupt, TimeoutError, ValueError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            res.ok, res.error = False, f"restore from {node_id} failed: {detail}"
        res.seconds = time.monotonic() - started
        res.mb_s = res.bytes / 1e6 / res.seconds if res.seconds > 0 and res.ok else 0.0
        return res

    def _restore_instance(self, stub: Any, m: node_pb2.Manifest) -> None:
        """Every chunk in file order, hash-checked as it streams in, then the whole file
        against its hash; one chunk in memory at a time."""
        hasher = FileHasher()
        refs = list(m.chunks)
        start = 0
        while start < len(refs):
            end, batch_bytes = start, 0
            while end < len(refs) and (end == start or batch_bytes < CHUNK_BATCH_BYTES_MAX):
                batch_bytes += refs[end].size
                end += 1
            batch = refs[start:end]
            replies = stub.FetchChunks(peer_pb2.FetchChunksRequest(hashes=[c.hash for c in batch]),
                                       timeout=RPC_TIMEOUT_S * 6)
            count = 0
            for ref, chunk in zip(batch, replies, strict=False):
                count += 1
                if chunk.missing or chunk.hash != ref.hash:
                    raise ValueError(f"instance {m.sop_instance_uid}: chunk "
                                     f"{ref.hash.hex()[:16]} not served ({chunk.reason})")
                plain = codec.decode(chunk.data, chunk.flags, ref.size)
                if len(plain) != ref.size or content_hash(plain) != ref.hash:
                    raise ValueError(f"instance {m.sop_instance_uid}: a chunk failed "
                                     "verification")
                hasher.update(plain)
            if count != len(batch):
                raise ValueError(f"instance {m.sop_instance_uid}: reply cut short")
            start = end
        if hasher.digest() != m.file_hash:
            raise ValueError(f"instance {m.sop_instance_uid}: restored bytes do not match the "
                             "manifest's file hash")


class DrillWorker(Worker):
    """Scheduled drills ([drill] interval_s, count)."""

    name = "drill"

    def __init__(self, drills: Drills, interval_s: float, count: int) -> None:
        self.drills = drills
        self.idle_s = interval_s
        self.count = count
        self._first = True

    async def step(self) -> WorkerState:
        if self._first:  # give membership and holdings time to settle after a start
            self._first = False
            return WorkerState.IDLE
        await asyncio.wait_for(self.drills.run(self.count), timeout=DRILL_TIMEOUT_S * 2)
        return WorkerState.IDLE
