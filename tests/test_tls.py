"""Mutual TLS and roles, with real node processes, real certificates and the real CLI.

One three-site federation configured as the README says (CA, node certificates
with their ids, a CRL) serves every check that does not need its own setup."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pacsmesh.node import pki
from pacsmesh.node.config import parse
from pacsmesh.node.errors import ConfigError
from pacsmesh.node.retention import RetentionSection, fingerprint
from pacsmesh.proto import node_pb2, node_pb2_grpc, peer_pb2, peer_pb2_grpc
from tests.clusterproc import CITIES, cluster_settings, make_study, wait_for
from tests.nodeproc import NodeProc, cli

NODES = (("boston", "Boston"), ("seattle", "Seattle"), ("denver", "Denver"))


def creds(pki_dir: Path, name: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((pki_dir / "ca.pem").read_bytes(),
                                        (pki_dir / f"{name}.key").read_bytes(),
                                        (pki_dir / f"{name}.pem").read_bytes())


def tls_args(pki_dir: Path, name: str) -> list[str]:
    return ["--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / f"{name}.pem"),
            "--key", str(pki_dir / f"{name}.key")]


def make_pki(root: Path) -> Path:
    d = root / "pki"
    pki.init_ca(d)
    for node_id, _ in NODES:
        pki.issue(d, node_id, "node", ["127.0.0.1"])
    pki.issue(d, "alice", "operator")
    pki.issue(d, "rita", "reader")
    pki.issue(d, "mallory", "node", ["127.0.0.1"])  # a valid member that was never started
    return d


def tls_node(workdir: Path, pki_dir: Path, node_id: str, city: str, seeds: list[str],
             **tls: Any) -> NodeProc:
    lat, lon = CITIES[city]
    section = {"ca_cert": str(pki_dir / "ca.pem"), "cert": str(pki_dir / f"{node_id}.pem"),
               "key": str(pki_dir / f"{node_id}.key"), "crl": str(pki_dir / "crl.pem")}
    section.update(tls)
    return NodeProc(workdir, node_id=node_id, site=city, lat=lat, lon=lon,
                    extra={"cluster": cluster_settings(seeds=seeds), "tls": section},
                    tls_client=(pki_dir / "ca.pem", pki_dir / "alice.pem",
                                pki_dir / "alice.key"))


class Federation:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = make_pki(root)
        self.nodes: list[NodeProc] = []
        for node_id, city in NODES:
            seeds = [self.nodes[0].address] if self.nodes else []
            self.nodes.append(tls_node(root, self.pki, node_id, city, seeds))

    def status(self, node: NodeProc, who: str = "alice") -> node_pb2.StatusReply:
        with grpc.secure_channel(node.address, creds(self.pki, who)) as ch:
            reply: node_pb2.StatusReply = node_pb2_grpc.NodeApiStub(ch).Status(
                node_pb2.StatusRequest(), timeout=5)
            return reply


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    f = Federation(tmp_path_factory.mktemp("tls"))
    try:
        for n in f.nodes:
            n.start(wait=False)
        for n in f.nodes:
            n.wait_ready()

        def converged() -> bool:
            for n in f.nodes:
                alive = [m for m in f.status(n).nodes if m.state == "alive"]
                assert len(alive) == 3, [(m.id, m.state) for m in f.status(n).nodes]
            return True
        wait_for(converged, 30, "three TLS members to see each other alive")
        yield f
    finally:
        for n in f.nodes:
            n.stop()


# ---- the CA --------------------------------------------------------------------------


def test_ca_keys_are_private_and_ca_is_never_overwritten(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    cert, key = pki.issue(d, "boston-1", "node", ["10.0.0.5", "boston.example"])
    for k in (d / "ca.key", key):
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.init_ca(d)
    with pytest.raises(pki.PkiError, match="--force"):
        pki.issue(d, "boston-1", "node")
    ident = pki.identity_of_pem(cert.read_bytes())
    assert ident is not None and (ident.name, ident.role) == ("boston-1", "node")
    assert pki.chain_problem(cert.read_bytes(), (d / "ca.pem").read_bytes()) is None


@pytest.mark.parametrize(("name", "role"), [("Boston_1", "node"), ("", "operator"),
                                            ("a" * 64, "node"), ("x", "admin")])
def test_ca_refuses_bad_names_and_roles(tmp_path: Path, name: str, role: str) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError):
        pki.issue(tmp_path, name, role)


def test_foreign_ca_and_forged_crl_are_refused(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    pki.init_ca(ours)
    pki.init_ca(theirs)
    cert, _ = pki.issue(theirs, "boston", "node")
    problem = pki.chain_problem(cert.read_bytes(), (ours / "ca.pem").read_bytes())
    assert problem is not None and "not issued by this cluster's CA" in problem
    pki.revoke(theirs, "boston")
    with pytest.raises(pki.PkiError, match="not signed by the cluster CA"):
        pki.read_crl(theirs / "crl.pem", (ours / "ca.pem").read_bytes())
    assert pki.read_crl(ours / "crl.pem", (ours / "ca.pem").read_bytes()) == set()


def test_cli_ca_commands(tmp_path: Path) -> None:
    d = str(tmp_path / "pki")
    assert cli("ca", "init", "--dir", d).returncode == 0
    res = cli("ca", "issue", "n1", "--role", "node", "--dir", d, "--host", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    res = cli("ca", "issue", "bad name!", "--role", "operator", "--dir", d)
    assert res.returncode == 1 and "is not valid" in res.stderr
    res = cli("ca", "revoke", "n1", "--dir", d)
    assert res.returncode == 0 and "revoked serial" in res.stdout


# ---- config ---------------------------------------------------------------------------


def _raw(listen: str, **tls: Any) -> dict[str, Any]:
    return {"node": {"data_dir": "/tmp/x", "listen": listen}, **({"tls": tls} if tls else {})}


def test_config_refuses_plaintext_beyond_loopback() -> None:
    with pytest.raises(ConfigError, match="plaintext"):
        parse(_raw("0.0.0.0:7400"))
    assert parse(_raw("127.0.0.1:7400")).tls.enabled is False
    assert parse(_raw("0.0.0.0:7400", insecure=True)).tls.insecure is True
    with pytest.raises(ConfigError, match="needs all of"):
        parse(_raw("0.0.0.0:7400", cert="a.pem"))
    with pytest.raises(ConfigError, match="hex serial"):
        parse(_raw("0.0.0.0:7400", ca_cert="c", cert="a", key="k", revoked_serials=["zz"]))


def test_node_identity_comes_from_its_certificate(tmp_path: Path) -> None:
    d = make_pki(tmp_path)
    wrong_id = tls_node(tmp_path, d, "boston", "Boston", [])
    wrong_id.extra["node"] = {"id": "seattle"}
    with pytest.raises(RuntimeError, match="a node's id is its certificate's"):
        wrong_id.start()
    reader = tls_node(tmp_path / "r", d, "boston", "Boston", [], cert=str(d / "rita.pem"),
                      key=str(d / "rita.key"))
    with pytest.raises(RuntimeError, match="a node needs one issued with --role node"):
        reader.start()


def test_insecure_plaintext_raises_an_alert(tmp_path: Path) -> None:
    node = NodeProc(tmp_path, node_id="open", extra={"tls": {"insecure": True}})
    node.extra["node"] = {"listen": f"0.0.0.0:{node.port}"}
    try:
        node.start()
        res = cli("status", "--json", node=node.address)
        assert '"PLAINTEXT"' in res.stdout, res.stdout
    finally:
        node.stop()


# ---- the federation -------------------------------------------------------------------


def test_roles_from_the_certificate(fed: Federation, tmp_path: Path) -> None:
    boston, seattle = fed.nodes[0], fed.nodes[1]
    study = make_study(tmp_path, 1, instances=3)
    op, reader = tls_args(fed.pki, "alice"), tls_args(fed.pki, "rita")
    res = cli("put", str(study.folder), "--wait-safe", "60", *op, node=boston.address)
    assert res.returncode == 0, res.stderr
    # a reader reads: status, ls, locate, get
    for args in (["status"], ["ls"], ["locate", study.uid],
                 ["get", study.uid, "--out", str(tmp_path / "out")]):
        res = cli(*args, *reader, node=seattle.address)
        assert res.returncode == 0, (args, res.stderr)
    study.check_restored(tmp_path / "out")
    # ... and nothing else
    for args in (["put", str(study.folder)], ["scrub", "--now"], ["drill"]):
        res = cli(*args, *reader, node=seattle.address)
        assert res.returncode == 1, (args, res.stdout)
        assert "has role 'reader'" in res.stderr, (args, res.stdout, res.stderr)
    # a node certificate cannot use the client API
    res = cli("status", *tls_args(fed.pki, "denver"), node=seattle.address)
    assert res.returncode == 1 and "has role 'node'" in res.stderr
    # a client certificate cannot use the peer API
    with (grpc.secure_channel(seattle.address, creds(fed.pki, "alice")) as ch,
          pytest.raises(grpc.RpcError) as err):
        peer_pb2_grpc.PeerApiStub(ch).GetRoot(peer_pb2.RootRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_certificate_or_a_foreign_one_gets_nothing(fed: Federation, tmp_path: Path) -> None:
    target = fed.nodes[2].address
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as err:
        node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue)
    pki.issue(rogue, "alice", "operator")
    pki.issue(rogue, "boston", "node", ["127.0.0.1"])
    # a foreign CA's operator, and a foreign CA's "boston" on the peer API
    foreign = grpc.ssl_channel_credentials((fed.pki / "ca.pem").read_bytes(),
                                           (rogue / "alice.key").read_bytes(),
                                           (rogue / "alice.pem").read_bytes())
    with grpc.secure_channel(target, foreign) as ch, pytest.raises(grpc.RpcError) as err:
        node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    fake = grpc.ssl_channel_credentials((fed.pki / "ca.pem").read_bytes(),
                                        (rogue / "boston.key").read_bytes(),
                                        (rogue / "boston.pem").read_bytes())
    with grpc.secure_channel(target, fake) as ch:
        stub = peer_pb2_grpc.PeerApiStub(ch)
        # the attacks of issue 9 without a certificate of ours: nothing gets through
        for call in (lambda: stub.GetRoot(peer_pb2.RootRequest(), timeout=5),
                     lambda: stub.Gossip(peer_pb2.GossipMessage(sender="boston"), timeout=5),
                     lambda: stub.Announce(peer_pb2.ManifestBatch(), timeout=5),
                     lambda: stub.PushHeld(peer_pb2.HeldDelta(node_id="boston"), timeout=5)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # the CLI says what to check
    res = cli("status", node=target)
    assert res.returncode == 1 and "TLS" in res.stderr


def test_a_member_cannot_speak_for_another(fed: Federation) -> None:
    """mallory holds a valid node certificate; it still cannot gossip or report holdings
    as boston."""
    seattle = fed.nodes[1]
    with grpc.secure_channel(seattle.address, creds(fed.pki, "mallory")) as ch:
        stub = peer_pb2_grpc.PeerApiStub(ch)
        for call in (
            lambda: stub.Gossip(peer_pb2.GossipMessage(sender="boston",
                                                       address=fed.nodes[0].address),
                                timeout=5),
            lambda: stub.PushHeld(peer_pb2.HeldDelta(node_id="boston"), timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "cannot speak for 'boston'" in (err.value.details() or "")


def test_a_dialled_peer_must_be_the_member_it_claims(fed: Federation) -> None:
    """A channel to member X verifies that the far end's certificate names X: a TLS
    server holding mallory's certificate cannot answer for boston."""
    from pacsmesh.cluster.peers import Peers
    from pacsmesh.node.tls import load_files
    files = load_files(fed.pki / "ca.pem", fed.pki / "seattle.pem", fed.pki / "seattle.key")
    boston = fed.nodes[0].address
    right = Peers(files, lambda address: "boston")
    assert right.blocking_stub(boston).GetRoot(peer_pb2.RootRequest(), timeout=5) is not None
    wrong = Peers(files, lambda address: "denver")  # gossip said denver lives there
    with pytest.raises(grpc.RpcError) as err:
        wrong.blocking_stub(boston).GetRoot(peer_pb2.RootRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_revocation_takes_effect_without_restart(fed: Federation) -> None:
    denver = fed.nodes[2]
    pki.issue(fed.pki, "temp-reader", "reader")
    with grpc.secure_channel(denver.address, creds(fed.pki, "temp-reader")) as ch:
        stub = node_pb2_grpc.NodeApiStub(ch)
        stub.Status(node_pb2.StatusRequest(), timeout=5)
        pki.revoke(fed.pki, "temp-reader")

        def refused() -> bool:
            try:
                stub.Status(node_pb2.StatusRequest(), timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return "revoked" in (exc.details() or "")
            return False
        wait_for(refused, 10, "the revoked certificate to be refused on its open channel")
    # the other members still talk to each other
    assert all(m.state == "alive" for m in fed.status(denver).nodes)


def test_revoked_serials_in_the_config_are_reread(fed: Federation) -> None:
    seattle = fed.nodes[1]
    cert, _ = pki.issue(fed.pki, "temp-op", "operator")
    ident = pki.identity_of_pem(cert.read_bytes())
    assert ident is not None
    with grpc.secure_channel(seattle.address, creds(fed.pki, "temp-op")) as ch:
        node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=5)
    cfg = seattle.workdir / f"{seattle.node_id}.toml"
    text = cfg.read_text().replace("[tls]", f'[tls]\nrevoked_serials = ["{ident.serial:x}"]')
    cfg.write_text(text)

    def refused() -> bool:
        with grpc.secure_channel(seattle.address, creds(fed.pki, "temp-op")) as ch:
            try:
                node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=5)
            except grpc.RpcError as exc:
                return "revoked" in (exc.details() or "")
        return False
    wait_for(refused, 10, "a serial added to the config to be refused")
    with contextlib.suppress(Exception):
        cfg.write_text(text.replace(f'revoked_serials = ["{ident.serial:x}"]\n', ""))


def test_audit_names_certificate_subjects_and_refusals(fed: Federation, tmp_path: Path
                                                       ) -> None:
    seattle = fed.nodes[1]
    study = make_study(tmp_path, 2, instances=2)
    op, reader = tls_args(fed.pki, "alice"), tls_args(fed.pki, "rita")
    assert cli("put", str(study.folder), *op, node=seattle.address).returncode == 0
    assert cli("scrub", "--now", *reader, node=seattle.address).returncode == 1
    res = cli("audit", "--json", *op, node=seattle.address)
    assert res.returncode == 0, res.stderr
    events = json.loads(res.stdout)["events"]
    assert any(e["who"] == "operator:alice" and e["action"] == "put"
               and e["study_uid"] == study.uid for e in events)
    assert any(e["who"] == "reader:rita" and e["action"] == "Scrub"
               and e["outcome"] == "refused" for e in events)
    res = cli("audit", *reader, node=seattle.address)
    assert res.returncode == 1 and "Audit needs operator" in res.stderr


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_versions(fed: Federation) -> None:
    """TLS 1.3 when both ends have it; nothing below 1.2 is accepted."""
    import socket
    import ssl
    host, port = fed.nodes[0].address.split(":")

    def handshake(version: ssl.TLSVersion) -> str:
        ctx = ssl.create_default_context(cafile=str(fed.pki / "ca.pem"))
        ctx.load_cert_chain(fed.pki / "alice.pem", fed.pki / "alice.key")
        ctx.set_alpn_protocols(["h2"])
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # we would speak TLS 1.1; the node must not
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version())

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError, match=r"(?i)version|protocol"):
        handshake(ssl.TLSVersion.TLSv1_1)


def test_a_revoked_node_is_out_of_the_cluster_without_restarts(tmp_path: Path) -> None:
    f = Federation(tmp_path)
    try:
        for n in f.nodes:
            n.start(wait=False)
        for n in f.nodes:
            n.wait_ready()
        boston, seattle, _denver = f.nodes

        def states(n: NodeProc) -> dict[str, str]:
            return {m.id: m.state for m in f.status(n).nodes}
        wait_for(lambda: all(set(states(n).values()) == {"alive"} and len(states(n)) == 3
                             for n in f.nodes), 30, "three members alive")
        pki.revoke(f.pki, "denver")

        def out() -> bool:
            for n in (boston, seattle):
                st = f.status(n)
                seen = {m.id: m.state for m in st.nodes}
                assert seen["denver"] == "dead" and seen[n.node_id] == "alive", seen
                assert "CERT_REVOKED" in [a.code for a in st.alerts]
            return True
        wait_for(out, 20, "denver to be out of the cluster on boston and seattle")
        assert states(boston)["seattle"] == "alive"
    finally:
        for n in f.nodes:
            n.stop()


def test_members_invented_by_hearsay_get_no_copies(tmp_path: Path) -> None:
    """mallory (a valid node certificate) tells seattle about "ghost", a member that
    never proves its id to anyone: it is listed, alerted, and never placed."""
    f = Federation(tmp_path)
    try:
        for n in f.nodes:
            n.start(wait=False)
        for n in f.nodes:
            n.wait_ready()
        seattle = f.nodes[1]
        ghost = peer_pb2.MemberRecord(node_id="ghost", site="Chicago", lat=41.88, lon=-87.63,
                                      address="127.0.0.1:1", capacity_bytes=1 << 50,
                                      incarnation=1, heartbeat=1, state="alive")
        with grpc.secure_channel(seattle.address, creds(f.pki, "mallory")) as ch:
            reply = peer_pb2_grpc.PeerApiStub(ch).Gossip(peer_pb2.GossipMessage(
                sender="mallory", address="127.0.0.1:2", members=[ghost],
                settings=peer_pb2.Settings(copies=3, min_distance_miles=250.0,
                                           partitions=64,
                                           retention=fingerprint(RetentionSection()))),
                timeout=5)
        assert reply is not None

        def flagged() -> bool:
            st = f.status(seattle)
            assert "ghost" in {m.id for m in st.nodes}
            assert "MEMBER_UNVERIFIED" in [a.code for a in st.alerts]
            return True
        wait_for(flagged, 10, "seattle to list ghost as unverified")
        study = make_study(tmp_path, 3, instances=2)
        res = cli("put", str(study.folder), "--wait-safe", "60", *tls_args(f.pki, "alice"),
                  node=seattle.address)
        assert res.returncode == 0, res.stderr  # safe on the three real sites
        ch2 = grpc.secure_channel(seattle.address, creds(f.pki, "alice"))
        with ch2:
            loc = node_pb2_grpc.NodeApiStub(ch2).Locate(
                node_pb2.LocateRequest(study_uid=study.uid), timeout=5)
        assert loc.safe and "ghost" not in {h.node for h in loc.holders}
    finally:
        for n in f.nodes:
            n.stop()


def test_a_modality_certificate_opens_nothing_on_grpc(fed: Federation) -> None:
    pki.issue(fed.pki, "ct1", "modality")
    for api in ("status", "ls"):
        res = cli(api, *tls_args(fed.pki, "ct1"), node=fed.nodes[0].address)
        assert res.returncode == 1 and "has role 'modality'" in res.stderr, res.stderr
    with (grpc.secure_channel(fed.nodes[0].address, creds(fed.pki, "ct1")) as ch,
          pytest.raises(grpc.RpcError) as err):
        peer_pb2_grpc.PeerApiStub(ch).GetRoot(peer_pb2.RootRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
