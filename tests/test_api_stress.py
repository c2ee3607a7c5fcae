"""API threads read what the event loop changes: hammer status, locate and ls on one
node while studies arrive, a member dies and comes back, and holdings, placement and
safety change underneath. Every answer must be well-formed and no call may fail
(the event loop publishes immutable snapshots; holdings and counters live in LMDB,
whose reads are consistent snapshots)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc

from pacsmesh.proto import node_pb2, node_pb2_grpc
from tests.clusterproc import cluster_of, make_study, wait_for
from tests.nodeproc import cli

READERS = 6
STUDIES = 8


def test_views_stay_consistent_while_everything_changes(tmp_path: Path) -> None:
    studies = [make_study(tmp_path / "in", i, instances=2) for i in range(STUDIES)]
    cities = [("boston", "Boston"), ("chicago", "Chicago"), ("denver", "Denver"),
              ("seattle", "Seattle")]
    errors: list[str] = []
    calls = [0]
    stop = threading.Event()
    with cluster_of(tmp_path / "c", *cities) as c:
        c.wait_converged()
        target = c.by_id("boston").address
        known: list[str] = []

        def hammer(seed: int) -> None:
            rng = random.Random(seed)
            with grpc.insecure_channel(target) as ch:
                stub = node_pb2_grpc.NodeApiStub(ch)
                while not stop.is_set():
                    try:
                        what = rng.randrange(3)
                        if what == 0:
                            st = stub.Status(node_pb2.StatusRequest(), timeout=10)
                            assert st.safe_studies + st.unsafe_studies == st.studies, st
                        elif what == 1 and known:
                            r = stub.Locate(node_pb2.LocateRequest(study_uid=rng.choice(known)),
                                            timeout=10)
                            assert r.safe_copies <= len(r.holders), r
                        else:
                            stub.ListStudies(node_pb2.ListStudiesRequest(limit=5), timeout=10)
                        calls[0] += 1
                    except grpc.RpcError as exc:
                        # a study put at another node may not have reached this one yet
                        if exc.code() != grpc.StatusCode.NOT_FOUND:
                            errors.append(f"{exc.code()}: {exc.details()}")
                    except AssertionError as exc:
                        errors.append(f"inconsistent answer: {exc}")

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(READERS)]
        for t in threads:
            t.start()
        try:
            for i, study in enumerate(studies):
                node = c.members[i % 3].address
                res = cli("put", str(study.folder), node=node)
                assert res.returncode == 0, res.stderr
                known.append(study.uid)
                if i == STUDIES // 2:
                    c.by_id("seattle").kill()  # placement and holders change under them
            time.sleep(6)  # seattle is declared dead, copies move
            c.by_id("seattle").start()

            def all_safe() -> bool:
                with grpc.insecure_channel(target) as ch:
                    st = node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(),
                                                              timeout=10)
                assert st.studies == STUDIES and st.unsafe_studies == 0, st.repair
                return True

            wait_for(all_safe, 60, "every study safe again")
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not errors, errors[:5]
    assert calls[0] > 200, calls
