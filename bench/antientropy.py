"""Anti-entropy cost follows the difference: 1,000,000 manifests on two nodes that
differ by 10 instances.

    python -m bench.antientropy [--manifests 1000000] [--differ 10] [--record]

Node A (a real `pacsmesh node` process) and node B (this process's store, driven
by the real AntiEntropyWorker over real gRPC) share `--manifests` manifests; A
holds `--differ` more, one in each of that many studies (the worst case: every
difference in its own partition). One anti-entropy round at B pulls them. We
record bytes received and time to converge, beside the size of a full listing.
The digests are maintained incrementally at insert time, so "once digests
exist" costs nothing extra: the insert rate is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import OUT_DIR, append_results, machine_line
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.cluster.workers import AntiEntropyWorker
from pacsmesh.node import manifest as mf
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2
from tests.nodeproc import NodeProc

PARTITIONS = 1024
INSTANCES_PER_STUDY = 100
TXN_BATCH = 20_000


def synthetic_manifest(i: int, study_no: int, instance_no: int) -> node_pb2.Manifest:
    study = f"1.2.826.0.1.3680043.10.1455.9.{study_no}"
    m = node_pb2.Manifest(
        format=1, hash_algo="blake3-256", chunk_size=1 << 20,
        sop_instance_uid=f"{study}.1.{instance_no}", series_instance_uid=f"{study}.1",
        study_instance_uid=study, patient_id=f"P{study_no:07d}", study_date="20260101",
        modality="CT", size=525_000, file_hash=os.urandom(32), header_len=1500,
        origin_node="a", received_hlc=(1_700_000_000_000 + i) << 16)
    m.chunks.add(hash=os.urandom(32), size=1500)
    m.chunks.add(hash=os.urandom(32), size=523_500)
    return m


def fill(store: Store, start: int, count: int, extra: bool = False) -> tuple[float, int]:
    """Insert manifests; returns (seconds, bytes of manifests)."""
    started = time.perf_counter()
    raw_bytes = 0
    i = start
    while i < start + count:
        with store.env.begin(write=True) as txn:
            for j in range(i, min(i + TXN_BATCH, start + count)):
                if extra:  # one new instance in each of several studies
                    m = synthetic_manifest(j, j - start, INSTANCES_PER_STUDY + 1)
                else:
                    m = synthetic_manifest(j, j // INSTANCES_PER_STUDY, j % INSTANCES_PER_STUDY)
                mid, raw = mf.encode(m)
                raw_bytes += len(raw)
                store.catalog.add(txn, mid, raw, m, 1)
        i += TXN_BATCH
        if not extra:
            print(f"  {min(i, start + count):>9,} manifests", end="\r", flush=True)
    return time.perf_counter() - started, raw_bytes


async def one_round(store: Store, address: str) -> tuple[float, int, int]:
    state = ClusterState("b", PARTITIONS, 3, 250.0, 600.0)
    peers = Peers()
    with ThreadPoolExecutor(4) as pool:
        r = Replicator(store, state, peers, "b", "127.0.0.1:0", HybridClock(), pool)
        worker = AntiEntropyWorker(r, 1.0)
        started = time.perf_counter()
        pulled = await worker.sync_with(address)
        seconds = time.perf_counter() - started
    await peers.close()
    return seconds, worker.last_bytes, pulled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifests", type=int, default=1_000_000)
    ap.add_argument("--differ", type=int, default=10)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ae-", dir=OUT_DIR))
    node: NodeProc | None = None
    try:
        a_dir = work / "a-data"
        print(f"building {args.manifests:,} manifests ...", flush=True)
        store = Store(a_dir, partitions=PARTITIONS)
        seconds, listing_bytes = fill(store, 0, args.manifests)
        insert_rate = args.manifests / seconds
        store.close()
        print(f"\n  {insert_rate:,.0f} manifests/s with digests maintained")
        shutil.copytree(a_dir, work / "b-data")
        (work / "b-data" / "LOCK").unlink(missing_ok=True)
        store = Store(a_dir, partitions=PARTITIONS)
        fill(store, args.manifests, args.differ, extra=True)
        store.close()

        node = NodeProc(work, node_id="a", extra={"cluster": {"partitions": PARTITIONS}})
        node.workdir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(a_dir), str(node.data_dir))
        node.start()
        b = Store(work / "b-data", partitions=PARTITIONS)
        try:
            seconds, received, pulled = asyncio.run(one_round(b, node.address))
            again, received_again, pulled_again = asyncio.run(one_round(b, node.address))
        finally:
            b.close()
        assert pulled == args.differ, f"pulled {pulled}, expected {args.differ}"
        assert pulled_again == 0
        ids_listing = args.manifests * 32
        text = "\n".join([
            f"{args.manifests:,} manifests on both nodes ({args.manifests // INSTANCES_PER_STUDY:,}"
            f" studies of {INSTANCES_PER_STUDY}), {args.differ} more on node A, each in its own "
            f"study; P = {PARTITIONS}.",
            "",
            "| what | bytes received | time |",
            "|---|---|---|",
            f"| anti-entropy round that pulls the {args.differ} | {received:,} | "
            f"{seconds:.2f} s |",
            f"| next round (already equal) | {received_again:,} | {again:.2f} s |",
            f"| full listing of manifest ids (32 B each) | {ids_listing:,} | |",
            f"| full listing of manifests | {listing_bytes:,} | |",
            "",
            f"Digests are kept up to date at insert: {insert_rate:,.0f} manifests/s into LMDB "
            "with every aggregate and digest maintained.",
        ])
        print()
        print(machine_line())
        print(text)
        if args.record:
            append_results("Anti-entropy: cost follows the difference", text)
        return 0
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
