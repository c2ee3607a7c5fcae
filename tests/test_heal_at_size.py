"""Self-healing at the size one center reaches in days, with real processes.

Five sites, copies 2, 20,000 studies written into the data dirs before start:
every node knows about 14,000 manifests it does not hold, more than the old
fetch window (10,000) and 200 times a fetch batch. A node is SIGKILLed; every
study it held must get its second distant copy back, and status must tell the
truth meanwhile (progress while copies are being re-created, 0 unsafe after).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pacsmesh.cluster import fetch
from pacsmesh.cluster.membership import Member, MemberState, NodeId
from pacsmesh.cluster.placement import PlacementNode
from pacsmesh.cluster.state import quantized_capacity
from tests import bulkload
from tests.clusterproc import CITIES, PARTITIONS, Cluster, api_status, started, states, wait_for

STUDIES = 20_000
COPIES = 2
CAPACITY = 1 << 40  # equal, a power of two: placement here is the nodes' own
SITES = (("atlanta", "Atlanta"), ("boston", "Boston"), ("chicago", "Chicago"),
         ("denver", "Denver"), ("seattle", "Seattle"))
VICTIM = "chicago"
HEAL_TIMEOUT_S = 240.0


def _load(args: tuple[Path, str, list[tuple[str, ...]]]) -> int:
    data_dir, node_id, replicas = args
    return bulkload.load(data_dir, node_id, STUDIES, replicas, PARTITIONS)


def test_every_copy_lost_with_a_node_is_recreated(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    for node_id, city in SITES:
        c.add(node_id, city, copies=COPIES, node={"capacity_bytes": CAPACITY},
              seeds=[] if not c.members else [c.members[0].address])
    nodes = []
    for m in c.members:
        lat, lon = CITIES[m.site]
        member = Member(NodeId(m.node_id), m.site, lat, lon, "", CAPACITY, 0, 0, 1, 0,
                        MemberState.ALIVE)
        nodes.append(PlacementNode(m.node_id, m.site, lat, lon, quantized_capacity(member)))
    replicas = bulkload.replica_sets(nodes, PARTITIONS, COPIES, 250.0)
    with ProcessPoolExecutor(2) as pool:
        held = dict(zip([m.node_id for m in c.members],
                        pool.map(_load, [(m.data_dir, m.node_id, replicas) for m in c.members]),
                        strict=True))
    assert STUDIES - held[VICTIM] > 100 * fetch.BATCH_MAX, held
    assert all(STUDIES - n > 10_000 for n in held.values()), held  # the old window
    with started(c):
        c.wait_converged(60)
        survivor = c.by_id("boston")

        def settled() -> bool:
            st = api_status(survivor.address)
            assert st.studies == STUDIES and st.unsafe_studies == 0, (
                st.studies, st.unsafe_studies, st.repair)
            return True

        wait_for(settled, 120, "every study to be judged safe before the kill")
        c.by_id(VICTIM).kill()
        seen_progress: list[int] = []

        def healed() -> bool:
            for m in c.running():
                st = api_status(m.address)
                if st.repair.backlog_instances:
                    seen_progress.append(st.repair.backlog_instances)
                assert states(st)[VICTIM] == "dead", states(st)
                # no verdict still queued: "0 unsafe" before that is status lagging
                assert st.repair.judging == 0 and st.unsafe_studies == 0, (
                    m.node_id, st.unsafe_studies, st.repair)
            return True

        wait_for(healed, HEAL_TIMEOUT_S, f"the {held[VICTIM]} studies {VICTIM} held to get "
                 "their second copy back", interval_s=1.0)
        assert max(seen_progress, default=0) > 0  # status showed the copies to re-create
        codes = {a.code for a in api_status(survivor.address).alerts}
        assert "REPAIR_STALLED" not in codes, codes
