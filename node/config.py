"""The node's TOML config, loaded once into frozen dataclasses and passed explicitly.

Unknown keys are errors, not warnings: a mistyped `copies` silently ignored would
leave an operator believing in copies that do not exist.
"""

from __future__ import annotations

import tomllib
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pacsmesh.node.errors import ConfigError
from pacsmesh.node.logsetup import FORMATS, LEVELS
from pacsmesh.node.retention import RetentionSection, parse_retention

# Peers bound how fast a relayed heartbeat may rise (cluster/membership.py
# GOSSIP_INTERVAL_S_MIN): a node gossiping faster would be taken for a liar.
GOSSIP_INTERVAL_S_MIN = 0.01


@dataclass(frozen=True)
class NodeSection:
    data_dir: Path
    id: str = ""
    site: str = ""
    lat: float = 0.0
    lon: float = 0.0
    listen: str = "0.0.0.0:7400"
    advertise: str = ""
    capacity_bytes: int = 0
    # a pack file is sealed at this size: big enough to keep few files and descriptors,
    # small enough to scrub, copy or compact one at a time
    pack_size_mb: int = 512


@dataclass(frozen=True)
class ClusterSection:
    seeds: tuple[str, ...] = ()
    copies: int = 3
    min_distance_miles: float = 250.0
    partitions: int = 1024
    gossip_interval_s: float = 1.0
    dead_after_s: float = 600.0
    suspect_after_s: float = 0.0  # 0 = five gossip intervals
    unsafe_alert_after_s: float = 3600.0  # an instance not safe by then is an alert
    repair_stalled_after_s: float = 300.0  # unsafe studies not decreasing this long: alert
    proof_audit_interval_s: float = 60.0  # a peer proves one claimed copy this often
    # A peer's version stamped further ahead of our clock waits until we catch up:
    # a forged far-future stamp would otherwise outrank every genuine version.
    max_clock_ahead_s: float = 300.0


@dataclass(frozen=True)
class DicomSection:
    listen: str = ""
    ae_title: str = "PACSMESH"
    allowed_calling_aets: tuple[str, ...] = ()
    destinations: dict[str, str] = field(default_factory=dict)
    max_associations: int = 16
    commitment_timeout_s: float = 3600.0
    # A connection must complete association negotiation (TLS handshake included)
    # this soon after it is accepted, or it is cut off: garbage, silent and
    # byte-a-second peers cannot hold a slot for longer.
    negotiation_timeout_s: float = 10.0
    # Connections from one IP address still negotiating at once; past this the
    # oldest is cut off, so one address cannot crowd out the others.
    max_pending_per_address: int = 4
    tls_listen: str = ""  # a second, DICOM TLS listener (BCP 195); "" = none
    tls_cert: str = ""  # default [tls] cert
    tls_key: str = ""  # default [tls] key
    tls_client_ca: str = ""  # client certificates must chain to it; default [tls] ca_cert


@dataclass(frozen=True)
class TransferSection:
    """What this node sends its peers (cluster/bandwidth.py). MB = 10^6 bytes."""

    rate_mb_s: float = 0.0  # all outbound replication; 0 = unlimited
    bulk_rate_mb_s: float = 0.0  # repair of older data and rebalance; 0 = up to rate_mb_s
    bulk_window: str = ""  # local "HH:MM-HH:MM" when bulk may flow; "" = always
    # when this node fetches, data ingested this recently is fresh (its senders never
    # hold it back); older data is bulk: repair if its study is short of copies
    fresh_s: float = 3600.0
    # zstd level we ask a sender for over a slow link (< 40 MB/s lately); 0 = as stored.
    # Off by default: a link that is slow because the CPUs are busy (the measured rate
    # cannot tell) would get slower still; set it where the WAN link is the bottleneck.
    wire_zstd_level: int = 0
    peers: dict[str, float] = field(default_factory=dict)  # node id -> MB/s to that peer


@dataclass(frozen=True)
class ScrubSection:
    rate_mb_s: float = 50.0
    interval_s: float = 604800.0


@dataclass(frozen=True)
class GcSection:
    """Space reclamation (node/gc.py). MB = 10^6 bytes."""

    rate_mb_s: float = 50.0  # bytes copied per second while compacting, at most
    interval_s: float = 3600.0  # a pass at least this often
    # an unreferenced chunk is kept this long: an upload in flight names chunks it
    # sent before its instance commits, and a trimmed copy may be wanted back soon
    loose_grace_s: float = 86400.0
    compact_below: float = 0.75  # a pack with a smaller live fraction is rewritten
    seal_min_dead_mb: float = 64.0  # seal the active pack to compact it past this much dead
    expiry_check_s: float = 60.0  # how often expired studies are looked for (node/expiry.py)


@dataclass(frozen=True)
class MetricsSection:
    listen: str = ""  # "HOST:PORT": Prometheus /metrics; "" = off


@dataclass(frozen=True)
class LogSection:
    format: str = "text"  # or "json": one object per line (node/logsetup.py)
    level: str = "info"  # debug, info, warning or error; $PACSMESH_LOG overrides it


@dataclass(frozen=True)
class DrillSection:
    interval_s: float = 0.0  # 0 = no scheduled drills
    count: int = 1


@dataclass(frozen=True)
class TlsSection:
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    crl: str = ""  # a CRL signed by the cluster CA (pacsmesh ca revoke), re-read on change
    revoked_serials: tuple[str, ...] = ()  # hex; re-read from this file on change
    insecure: bool = False  # plaintext beyond loopback: only on purpose, and alerted

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class Config:
    node: NodeSection
    cluster: ClusterSection = field(default_factory=ClusterSection)
    dicom: DicomSection = field(default_factory=DicomSection)
    scrub: ScrubSection = field(default_factory=ScrubSection)
    drill: DrillSection = field(default_factory=DrillSection)
    tls: TlsSection = field(default_factory=TlsSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    gc: GcSection = field(default_factory=GcSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)
    path: Path | None = None

    @property
    def advertise(self) -> str:
        return self.node.advertise or self.node.listen


def _section(cls: type, raw: dict[str, Any], name: str, **extra: Any) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = dict(extra)
    for key, given in raw.items():
        value = given
        if key not in known or key in extra:
            raise ConfigError(f"[{name}] has an unknown key '{key}'")
        f = known[key]
        want = str(f.type)
        try:
            if want.startswith("tuple"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError
                value = tuple(value)
            elif want == "float":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise TypeError
                value = float(value)
            elif want == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError
            elif want == "bool":
                if not isinstance(value, bool):
                    raise TypeError
            elif want == "str":
                if not isinstance(value, str):
                    raise TypeError
            elif want == "Path":
                if not isinstance(value, str):
                    raise TypeError
                value = Path(value)
        except TypeError:
            raise ConfigError(f"[{name}] {key} = {value!r} is not a {want}") from None
        values[key] = value
    return cls(**values)


def _check_address(value: str, what: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} = {value!r} is not HOST:PORT")


def _dicom_tls(dicom: DicomSection, tls: TlsSection) -> DicomSection:
    """Checks the DICOM TLS keys and fills in the [tls] defaults, so the listener
    reads its files from one place."""
    own = [k for k in ("tls_cert", "tls_key", "tls_client_ca") if getattr(dicom, k)]
    if not dicom.tls_listen:
        if own:  # set but unused: the operator would believe DICOM is encrypted
            raise ConfigError(f"[dicom] {', '.join(own)} set without [dicom] tls_listen")
        return dicom
    _check_address(dicom.tls_listen, "[dicom] tls_listen")
    if dicom.tls_listen == dicom.listen:
        raise ConfigError("[dicom] tls_listen and listen must differ")
    if bool(dicom.tls_cert) != bool(dicom.tls_key):
        raise ConfigError("[dicom] tls_cert and tls_key go together")
    resolved = replace(dicom, tls_cert=dicom.tls_cert or tls.cert,
                       tls_key=dicom.tls_key or tls.key,
                       tls_client_ca=dicom.tls_client_ca or tls.ca_cert)
    if not (resolved.tls_cert and resolved.tls_key):
        raise ConfigError("[dicom] tls_listen needs a certificate: set [dicom] tls_cert and "
                          "tls_key, or [tls] cert and key")
    if not resolved.tls_client_ca:
        raise ConfigError("[dicom] tls_listen needs the CA that signs client certificates: "
                          "set [dicom] tls_client_ca or [tls] ca_cert")
    return resolved


def parse(raw: dict[str, Any], path: Path | None = None) -> Config:
    for section in raw:
        if section not in ("node", "cluster", "dicom", "scrub", "drill", "tls", "transfer",
                           "gc", "retention", "metrics", "log"):
            raise ConfigError(f"unknown section [{section}]")
    node_raw = dict(raw.get("node", {}))
    if "data_dir" not in node_raw:
        raise ConfigError("[node] data_dir is required")
    node = _section(NodeSection, node_raw, "node")
    if not -90 <= node.lat <= 90 or not -180 <= node.lon <= 180:
        raise ConfigError(f"[node] lat/lon {node.lat},{node.lon} are not coordinates")
    if node.capacity_bytes < 0:
        raise ConfigError("[node] capacity_bytes must be >= 0")
    if not 1 <= node.pack_size_mb <= 4096:
        raise ConfigError("[node] pack_size_mb must be 1 to 4096")
    _check_address(node.listen, "[node] listen")
    if node.advertise:
        _check_address(node.advertise, "[node] advertise")
    cluster = _section(ClusterSection, raw.get("cluster", {}), "cluster")
    if cluster.copies < 1 or cluster.partitions < 1 or cluster.min_distance_miles < 0:
        raise ConfigError("[cluster] copies and partitions must be >= 1, distance >= 0")
    if (cluster.gossip_interval_s <= 0 or cluster.dead_after_s <= 0
            or cluster.repair_stalled_after_s <= 0 or cluster.proof_audit_interval_s <= 0
            or cluster.max_clock_ahead_s <= 0):
        raise ConfigError("[cluster] gossip_interval_s, dead_after_s, repair_stalled_after_s, "
                          "proof_audit_interval_s and max_clock_ahead_s must be > 0")
    if cluster.gossip_interval_s < GOSSIP_INTERVAL_S_MIN:
        raise ConfigError(f"[cluster] gossip_interval_s must be >= {GOSSIP_INTERVAL_S_MIN}")
    for seed in cluster.seeds:
        _check_address(seed, "[cluster] seeds entry")
    dicom_raw = dict(raw.get("dicom", {}))
    dests = dicom_raw.pop("destinations", {})
    if not isinstance(dests, dict) or not all(isinstance(v, str) for v in dests.values()):
        raise ConfigError("[dicom.destinations] must map AE titles to \"host:port\"")
    for ae, addr in dests.items():
        _check_address(addr, f"[dicom.destinations] {ae}")
    dicom = _section(DicomSection, dicom_raw, "dicom", destinations=dict(dests))
    if dicom.listen:
        _check_address(dicom.listen, "[dicom] listen")
    if not 0 < len(dicom.ae_title) <= 16:
        raise ConfigError("[dicom] ae_title must be 1 to 16 characters")
    if dicom.max_associations < 1 or dicom.max_pending_per_address < 1:
        raise ConfigError("[dicom] max_associations and max_pending_per_address must be >= 1")
    if not 0 < dicom.negotiation_timeout_s <= 300:
        raise ConfigError("[dicom] negotiation_timeout_s must be > 0 and <= 300")
    scrub = _section(ScrubSection, raw.get("scrub", {}), "scrub")
    drill = _section(DrillSection, raw.get("drill", {}), "drill")
    tls = _section(TlsSection, raw.get("tls", {}), "tls")
    dicom = _dicom_tls(dicom, tls)
    given = [k for k in ("ca_cert", "cert", "key") if getattr(tls, k)]
    if given and len(given) != 3:
        raise ConfigError("[tls] needs all of ca_cert, cert and key (got only "
                          f"{', '.join(given)})")
    if (tls.crl or tls.revoked_serials) and not tls.enabled:
        raise ConfigError("[tls] crl and revoked_serials need ca_cert, cert and key")
    from pacsmesh.node.tls import is_loopback, parse_serials
    parse_serials(tls.revoked_serials)
    if not tls.enabled and not tls.insecure and not is_loopback(node.listen):
        raise ConfigError(
            f"[node] listen = {node.listen!r} would serve patient data in plaintext: set "
            "[tls] ca_cert, cert and key (see README, Securing a federation), listen on "
            "127.0.0.1, or set [tls] insecure = true to accept the risk (an alert)")
    gc = _section(GcSection, raw.get("gc", {}), "gc")
    if (gc.rate_mb_s <= 0 or gc.interval_s <= 0 or gc.loose_grace_s < 0 or gc.expiry_check_s <= 0
            or gc.seal_min_dead_mb < 0 or not 0 < gc.compact_below <= 1):
        raise ConfigError("[gc] rate_mb_s, interval_s and expiry_check_s must be > 0, "
                          "loose_grace_s and "
                          "seal_min_dead_mb >= 0, compact_below in (0, 1]")
    metrics = _section(MetricsSection, raw.get("metrics", {}), "metrics")
    if metrics.listen:
        _check_address(metrics.listen, "[metrics] listen")
    return Config(node=node, cluster=cluster, dicom=dicom, scrub=scrub, drill=drill, tls=tls,
                  transfer=_transfer(raw.get("transfer", {})), gc=gc,
                  retention=parse_retention(raw.get("retention", {})), metrics=metrics,
                  log=_log(raw.get("log", {})), path=path)


def _log(raw: Any) -> LogSection:
    if not isinstance(raw, dict):
        raise ConfigError("[log] must be a table")
    log: LogSection = _section(LogSection, raw, "log")
    if log.format not in FORMATS:
        raise ConfigError(f"[log] format = {log.format!r} is not one of "
                          f"{', '.join(repr(f) for f in FORMATS)}")
    if log.level.lower() not in LEVELS:
        raise ConfigError(f"[log] level = {log.level!r} is not one of "
                          f"{', '.join(repr(v) for v in LEVELS)}")
    return replace(log, level=log.level.lower())


def _transfer(raw: Any) -> TransferSection:
    if not isinstance(raw, dict):
        raise ConfigError("[transfer] must be a table")
    raw = dict(raw)
    peers = raw.pop("peers", {})
    if not isinstance(peers, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            for v in peers.values()):
        raise ConfigError("[transfer.peers] must map node ids to MB/s > 0, e.g. seattle = 2.5")
    t: TransferSection = _section(TransferSection, raw, "transfer",
                                  peers={k: float(v) for k, v in peers.items()})
    if not 0 <= t.wire_zstd_level <= 9:
        raise ConfigError("[transfer] wire_zstd_level must be 0 (send as stored) to 9")
    if t.rate_mb_s < 0 or t.bulk_rate_mb_s < 0 or t.fresh_s < 0:
        raise ConfigError("[transfer] rate_mb_s, bulk_rate_mb_s and fresh_s must be >= 0 "
                          "(0 rate = unlimited)")
    from pacsmesh.cluster.bandwidth import parse_window
    try:
        parse_window(t.bulk_window)
    except ValueError as exc:
        raise ConfigError(f"[transfer] bulk_window: {exc}") from exc
    return t


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    cfg = parse(raw, path)
    # Paths are relative to the config file, not the cwd.
    if not cfg.node.data_dir.is_absolute():
        node = NodeSection(**{**cfg.node.__dict__, "data_dir": path.parent / cfg.node.data_dir})
        cfg = replace(cfg, node=node)
    tls = cfg.tls
    files: dict[str, Any] = {k: str(path.parent / v) for k in ("ca_cert", "cert", "key", "crl")
             if (v := getattr(tls, k)) and not Path(v).is_absolute()}
    if files:
        cfg = replace(cfg, tls=replace(tls, **files))
    dicom = cfg.dicom
    dicom_files: dict[str, Any] = {
        k: str(path.parent / v) for k in ("tls_cert", "tls_key", "tls_client_ca")
        if (v := getattr(dicom, k)) and not Path(v).is_absolute()}
    if dicom_files:
        cfg = replace(cfg, dicom=replace(dicom, **dicom_files))
    return cfg


def node_id_for(cfg: Config) -> str:
    """The configured id, else the one generated on first start and kept in the data dir."""
    id_file = cfg.node.data_dir / "node_id"
    if id_file.exists():
        stored = id_file.read_text().strip()
        if cfg.node.id and stored != cfg.node.id:
            raise ConfigError(
                f"data dir {cfg.node.data_dir} belongs to node '{stored}', config says "
                f"'{cfg.node.id}'"
            )
        return stored
    node_id = cfg.node.id or f"node-{uuid.uuid4().hex[:12]}"
    cfg.node.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    tmp.replace(id_file)
    return node_id
