"""The shipped compose federation: every file, port, volume and command that
docker-compose.yml names exists and agrees with the Dockerfile and the site configs,
and the same five configs, run as real node processes, form a federation that makes
a study safe. There is no Docker engine here: the compose run itself is not tested,
only everything it is made of."""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

from pacsmesh.cli import build_parser
from pacsmesh.cluster.placement import great_circle_miles, max_pairwise_set_size
from pacsmesh.node.config import Config, load
from tests.clusterproc import (
    Cluster,
    api_locate,
    api_status,
    holder_ids,
    make_study,
    started,
    states,
    wait_for,
)
from tests.deployfiles import (
    COMPOSE,
    DOCKERFILE,
    ROOT,
    Mount,
    Port,
    compose,
    copy_sources,
    dockerfile_stages,
    dockerignore_patterns,
    ignored,
    parse_port,
    parse_volume,
)
from tests.nodeproc import NodeProc, cli, cli_json, free_port

SITES = 5
CONFIG_IN_IMAGE = "/etc/pacsmesh/node.toml"
WAIT_SAFE_S = 60


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@dataclasses.dataclass
class Site:
    service: str
    spec: dict[str, Any]
    config_path: Path
    config: Config
    mounts: list[Mount]
    ports: list[Port]


def _sites() -> list[Site]:
    sites = []
    for name, spec in compose()["services"].items():
        mounts = [parse_volume(v) for v in spec.get("volumes", [])]
        (cfg_mount,) = [m for m in mounts if m.target == CONFIG_IN_IMAGE]
        assert not cfg_mount.named and cfg_mount.read_only, cfg_mount
        path = (COMPOSE.parent / cfg_mount.source).resolve()
        assert path.is_file(), f"{name} mounts {cfg_mount.source}, which does not exist"
        assert path.parent == ROOT / "deploy" / "compose", path
        sites.append(Site(name, spec, path, load(path), mounts,
                          [parse_port(p) for p in spec.get("ports", [])]))
    return sites


def _image_argv() -> list[str]:
    runtime = dockerfile_stages()[-1]
    return runtime.exec_form("ENTRYPOINT") + runtime.exec_form("CMD")


def _parses_as_cli(argv: list[str]) -> str:
    """argv (after the program name) is a real `pacsmesh` command line: its verb."""
    args = build_parser().parse_args(argv)  # SystemExit on an unknown verb or option
    return str(args.command)


# ---- what the compose file names ------------------------------------------------------


def test_every_build_context_dockerfile_and_command_exists() -> None:
    doc = compose()
    assert len(doc["services"]) == SITES
    for name, spec in doc["services"].items():
        build = spec["build"]
        context = COMPOSE.parent / (build if isinstance(build, str) else build["context"])
        dockerfile = context / ("Dockerfile" if isinstance(build, str)
                                else build.get("dockerfile", "Dockerfile"))
        assert context.resolve() == ROOT and dockerfile.resolve() == DOCKERFILE, name
        assert "command" not in spec and "entrypoint" not in spec, (
            f"{name}: the image's own command is the one checked here")
    argv = _image_argv()
    assert argv[0] == "pacsmesh"
    assert _parses_as_cli(argv[1:]) == "node"
    assert argv[1:] == ["node", "--config", CONFIG_IN_IMAGE]


def test_every_config_mount_port_and_volume_is_consistent() -> None:
    sites = _sites()
    doc = compose()
    declared = set(doc.get("volumes") or {})
    named_used: list[str] = []
    host_ports: list[tuple[str, int]] = []
    expose = {int(p) for rest in dockerfile_stages()[-1].all("EXPOSE") for p in rest.split()}
    services = {s.service for s in sites}
    for s in sites:
        cfg = s.config
        assert cfg.node.id == s.service, "node id = service name = host name, one of each"
        assert cfg.node.advertise == f"{s.service}:{_port_of(cfg.node.listen)}", (
            f"{s.service}: peers reach it by its service name on the compose network")
        assert cfg.node.listen.startswith("0.0.0.0:") and cfg.dicom.listen.startswith("0.0.0.0:")
        # data_dir is this site's own named volume, declared at the top level
        (data,) = [m for m in s.mounts if m.target == str(cfg.node.data_dir)]
        assert data.named and not data.read_only and data.source in declared, data
        named_used += [m.source for m in s.mounts if m.named]
        assert all(m.named or m.target == CONFIG_IN_IMAGE for m in s.mounts), s.mounts
        # published container ports are exactly the config's gRPC and DICOM ports
        grpc_port, dicom_port = _port_of(cfg.node.listen), _port_of(cfg.dicom.listen)
        assert sorted(p.container for p in s.ports) == sorted([grpc_port, dicom_port]), s.ports
        assert {grpc_port, dicom_port} <= expose, (expose, s.service)
        assert all(p.host_ip == "127.0.0.1" for p in s.ports), (
            "plaintext ([tls] insecure): published on this host's loopback only")
        assert cfg.tls.insecure and not cfg.tls.enabled
        host_ports += [("tcp", p.host) for p in s.ports]
        # seeds are sites of this file, at their gRPC port
        for seed in cfg.cluster.seeds:
            host, _, port = seed.rpartition(":")
            assert host in services, f"{s.service}: seed {seed} is not a service"
            peer = next(x for x in sites if x.service == host)
            assert int(port) == _port_of(peer.config.node.listen), seed
        assert len(set(cfg.cluster.seeds) - {cfg.node.advertise}) >= 2, (
            "at least two other seeds, so one site down never keeps a node from joining")
        # the healthcheck is the real CLI verb, asking this node's gRPC port
        test = s.spec["healthcheck"]["test"]
        assert test[:2] == ["CMD", "pacsmesh"], test
        assert _parses_as_cli(test[2:]) == "health"
        node_arg = test[test.index("--node") + 1]
        assert node_arg == f"127.0.0.1:{grpc_port}", node_arg
        assert s.spec.get("restart") == "unless-stopped"
    assert len(set(host_ports)) == len(host_ports), f"host ports collide: {host_ports}"
    assert sorted(named_used) == sorted(declared), "one declared volume per site, all used"
    assert len(set(named_used)) == len(named_used) == SITES
    # every cluster-wide setting is equal, as peers require
    for attr in ("copies", "min_distance_miles", "partitions"):
        assert len({getattr(s.config.cluster, attr) for s in sites}) == 1, attr
    assert len({s.config.dicom.ae_title for s in sites}) == SITES
    # and no config file lies around unused
    assert {s.config_path for s in sites} == set((ROOT / "deploy" / "compose").glob("*.toml"))


def test_the_rule_is_satisfiable_with_any_one_site_down() -> None:
    sites = _sites()
    cluster = sites[0].config.cluster
    positions = [(s.config.node.site, s.config.node.lat, s.config.node.lon) for s in sites]
    assert len({p[0] for p in positions}) == SITES, "five distinct sites"
    assert max_pairwise_set_size(positions, cluster.min_distance_miles) >= cluster.copies
    for down in range(SITES):
        rest = positions[:down] + positions[down + 1:]
        assert max_pairwise_set_size(rest, cluster.min_distance_miles) >= cluster.copies, (
            f"{positions[down][0]} down leaves no {cluster.copies} sites pairwise "
            f">= {cluster.min_distance_miles:g} miles apart")
    # as the compose file's header says: every pair far enough, so any two may be down
    miles = [great_circle_miles(a[1], a[2], b[1], b[2])
             for a, b in itertools.combinations(positions, 2)]
    assert min(miles) >= cluster.min_distance_miles, miles


def test_the_dockerfile_installs_a_built_wheel_not_the_tree() -> None:
    build, runtime = dockerfile_stages()
    assert build.name and runtime.base == build.base, "multi-stage, the same Python"
    assert any("pip wheel" in r and "--no-deps" in r for r in build.all("RUN"))
    assert [rest.split()[0] for rest in runtime.all("COPY")] == [f"--from={build.name}"], (
        "the runtime takes only the wheel from the build stage, nothing from the tree")
    (install,) = [r for r in runtime.all("RUN") if "pip install" in r]
    assert ".whl" in install and " -e " not in install and "--editable" not in install
    # the node runs unprivileged and owns the data dir, which a fresh named volume copies
    (user,) = runtime.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    for data_dir in {str(s.config.node.data_dir) for s in _sites()}:
        assert f"mkdir {data_dir} && chown {user} {data_dir}" in install, data_dir
    (check,) = runtime.all("HEALTHCHECK")
    argv = json.loads(check.split(" CMD ", 1)[1])
    assert argv[0] == "pacsmesh" and _parses_as_cli(argv[1:]) == "health"
    # every COPY source exists and .dockerignore keeps none of them out
    patterns = dockerignore_patterns()
    for sources, _target in copy_sources(build):
        for src in sources:
            assert (ROOT / src).exists(), src
            assert not ignored(src, patterns), src
    for junk in (".git", ".venv", "bench/out", "data", "build", "node/__pycache__"):
        assert ignored(junk, patterns), f".dockerignore lets {junk} into the build context"
    # each package the wheel is built from is copied (pacsmesh/ links to the rest)
    copied = {src for sources, _ in copy_sources(build) for src in sources}
    assert {"pyproject.toml", "README.md", "pacsmesh", "node", "cluster", "proto"} <= copied


# ---- the same configs as real processes ---------------------------------------------------


def _on_loopback(site: Site, workdir: Path, grpc_ports: dict[str, int]) -> NodeProc:
    """A NodeProc running the site's config file with only what one host needs changed:
    addresses and ports on 127.0.0.1, seeds by those addresses, a data dir of its own."""
    raw = tomllib.loads(site.config_path.read_text())
    address = {f"{svc}:{_port_of(site.config.node.listen)}": f"127.0.0.1:{port}"
               for svc, port in grpc_ports.items()}
    port = grpc_ports[site.service]
    proc = NodeProc(workdir, node_id=raw["node"]["id"], site=raw["node"]["site"],
                    lat=raw["node"]["lat"], lon=raw["node"]["lon"], port=port)
    node = {**raw["node"], "listen": proc.address, "advertise": proc.address,
            "data_dir": str(proc.data_dir)}
    cluster = {**raw["cluster"], "seeds": [address[s] for s in raw["cluster"]["seeds"]]}
    dicom = {**raw["dicom"], "listen": f"127.0.0.1:{free_port()}"}
    proc.extra = {**raw, "node": node, "cluster": cluster, "dicom": dicom}
    # nothing else differs from the file: compare what the node's own loader makes of both
    ours = load(proc.config())
    theirs = site.config
    expect = dataclasses.replace(
        theirs, path=ours.path,
        node=dataclasses.replace(theirs.node, listen=proc.address, advertise=proc.address,
                                 data_dir=proc.data_dir),
        cluster=dataclasses.replace(theirs.cluster, seeds=tuple(cluster["seeds"])),
        dicom=dataclasses.replace(theirs.dicom, listen=dicom["listen"]))
    assert ours == expect
    return proc


def test_the_five_configs_form_a_federation_that_makes_a_study_safe(tmp_path: Path) -> None:
    sites = _sites()
    grpc_ports = {s.service: free_port() for s in sites}
    c = Cluster(tmp_path, members=[_on_loopback(s, tmp_path, grpc_ports) for s in sites])
    with started(c):
        c.wait_converged(timeout_s=30)
        for s, member in zip(sites, c.members, strict=True):  # the compose healthcheck
            argv = s.spec["healthcheck"]["test"][2:]
            argv[argv.index("--node") + 1] = member.address
            res = cli(*argv)
            assert res.returncode == 0 and "SERVING" in res.stdout, (res.stdout, res.stderr)
        seen = states(api_status(c.members[-1].address))
        assert seen == {s.service: "alive" for s in sites}, seen

        study = make_study(tmp_path / "studies", index=1, instances=3)
        first = c.members[0]
        put = cli_json("put", str(study.folder), "--wait-safe", str(WAIT_SAFE_S),
                       node=first.address, timeout_s=WAIT_SAFE_S + 30)
        assert put["stored"] == study.instances and put["safe"] == {study.uid: True}, put

        def safe_everywhere() -> bool:
            for m in c.members:
                located = api_locate(m.address, study.uid)
                assert located.safe and located.safe_copies >= 3, (m.node_id, located)
            return True

        wait_for(safe_everywhere, 30, "every site to see the study safe")
        holders = holder_ids(api_locate(first.address, study.uid))
        assert len(holders) >= 3, holders
        elsewhere = next((m for m in c.members if m.node_id not in holders), None)
        assert elsewhere is not None, f"every site holds a copy: {holders}"
        out = tmp_path / "restored"
        cli("get", study.uid, "--out", str(out), node=elsewhere.address, check=True)
        study.check_restored(out)

