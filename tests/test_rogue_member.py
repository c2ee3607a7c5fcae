"""A member with a valid node certificate that lies about capacity and copies cannot
talk the honest sites out of their copies, and status stops counting its claims.

Four honest sites hold studies at 2 copies; then "mallory" joins with a valid node
certificate, a huge capacity (so placement hands it most studies) and, as its own,
every copy the origin holds (relayed answers, even to proof-of-possession
challenges). Before issue 9 the honest sites outside the new replica sets trimmed
their copies on its word."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pacsmesh.cluster.membership import ClusterSettings
from pacsmesh.node import pki
from pacsmesh.node.retention import RetentionSection, fingerprint
from pacsmesh.node.tls import load_files
from pacsmesh.proto import node_pb2, node_pb2_grpc
from tests.clusterproc import CITIES, cluster_settings, make_study, wait_for
from tests.nodeproc import NodeProc, cli, free_port
from tests.rogue import Rogue

HONEST = (("boston", "Boston"), ("seattle", "Seattle"), ("denver", "Denver"),
          ("atlanta", "Atlanta"))
COPIES = 2
STUDIES = 8


def stub(pki_dir: Path, node: NodeProc) -> tuple[grpc.Channel, node_pb2_grpc.NodeApiStub]:
    creds = grpc.ssl_channel_credentials((pki_dir / "ca.pem").read_bytes(),
                                         (pki_dir / "alice.key").read_bytes(),
                                         (pki_dir / "alice.pem").read_bytes())
    ch = grpc.secure_channel(node.address, creds)
    return ch, node_pb2_grpc.NodeApiStub(ch)


@pytest.fixture
def honest(tmp_path: Path) -> Iterator[tuple[Path, list[NodeProc]]]:
    d = tmp_path / "pki"
    pki.init_ca(d)
    for node_id in [n for n, _ in HONEST] + ["mallory"]:
        pki.issue(d, node_id, "node", ["127.0.0.1"])
    pki.issue(d, "alice", "operator")
    nodes: list[NodeProc] = []
    for node_id, city in HONEST:
        lat, lon = CITIES[city]
        seeds = [nodes[0].address] if nodes else []
        tls = {"ca_cert": str(d / "ca.pem"), "cert": str(d / f"{node_id}.pem"),
               "key": str(d / f"{node_id}.key")}
        nodes.append(NodeProc(
            tmp_path, node_id=node_id, site=city, lat=lat, lon=lon,
            extra={"cluster": cluster_settings(seeds=seeds, copies=COPIES,
                                               proof_audit_interval_s=0.3),
                   "tls": tls},
            tls_client=(d / "ca.pem", d / "alice.pem", d / "alice.key")))
    try:
        for n in nodes:
            n.start(wait=False)
        for n in nodes:
            n.wait_ready()
        yield d, nodes
    finally:
        for n in nodes:
            n.stop()


def local_holders(pki_dir: Path, nodes: list[NodeProc]) -> dict[str, set[str]]:
    """study -> the honest nodes that hold it in full, verified, as each says itself."""
    out: dict[str, set[str]] = {}
    for n in nodes:
        ch, s = stub(pki_dir, n)
        with ch:
            page = s.ListStudies(node_pb2.ListStudiesRequest(local=True, limit=1000), timeout=5)
        for st in page.studies:
            out.setdefault(st.study_uid, set()).add(n.node_id)
    return out


def test_a_lying_member_with_a_valid_certificate_loses_no_copy(
        honest: tuple[Path, list[NodeProc]], tmp_path: Path) -> None:
    d, nodes = honest
    boston = nodes[0]
    op = ["--ca", str(d / "ca.pem"), "--cert", str(d / "alice.pem"), "--key",
          str(d / "alice.key")]
    studies = [make_study(tmp_path / "s", i, instances=2) for i in range(STUDIES)]
    for st in studies:
        res = cli("put", str(st.folder), "--wait-safe", "60", *op, node=boston.address)
        assert res.returncode == 0, res.stderr
    before = local_holders(d, nodes)
    assert all(len(before[st.uid]) >= COPIES for st in studies), before

    lat, lon = CITIES["Chicago"]
    settings = cluster_settings()
    rogue = Rogue("mallory", "Chicago", lat, lon, free_port(),
                  load_files(d / "ca.pem", d / "mallory.pem", d / "mallory.key"),
                  [boston.address], boston.address,
                  ClusterSettings(COPIES, settings["min_distance_miles"],
                                  settings["partitions"], fingerprint(RetentionSection())),
                  settings["gossip_interval_s"], settings["dead_after_s"]).start()
    try:
        def everyone_caught_it() -> bool:
            for n in nodes:
                ch, s = stub(d, n)
                with ch:
                    st = s.Status(node_pb2.StatusRequest(), timeout=5)
                assert any(m.id == "mallory" and m.state == "alive" for m in st.nodes)
                assert any(a.code == "PROOF_FAILED" and "mallory" in a.message
                           for a in st.alerts), (n.node_id, [a.code for a in st.alerts])
            return True
        wait_for(everyone_caught_it, 60, "every honest node to catch mallory's false claims")
        # placement moved to mallory meanwhile: trims had every chance to happen
        after = local_holders(d, nodes)
        for st in studies:
            assert len(after[st.uid]) >= COPIES, (st.uid, before[st.uid], after[st.uid])
        # status tells the truth: mallory's claims are not counted as copies
        for n in nodes:
            ch, s = stub(d, n)
            with ch:
                for st in studies:
                    loc = s.Locate(node_pb2.LocateRequest(study_uid=st.uid), timeout=5)
                    assert "mallory" not in {h.node for h in loc.holders}, n.node_id
                    assert loc.safe_copies <= len(after[st.uid])
    finally:
        rogue.stop()
