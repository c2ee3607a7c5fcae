"""The cluster's certificate authority: `pacsmesh ca init / issue / revoke`.

One CA per federation. Every certificate names one principal and one role:
the subject is O=pacsmesh, OU=<role>, CN=<name>. A node's name is its node id,
and its certificate carries that id as a DNS name too, so a peer dialling node
X can demand that the far end *is* X (TLS host verification against the id),
whatever address gossip gave for it. Keys are ECDSA P-256 (fast handshakes,
supported by every TLS stack we meet); private keys are written 0600.

Revocation is a CRL signed by the CA (DIR/crl.pem): nodes that point
`[tls] crl` at it re-read it when it changes, so a revoked certificate is
refused without restarting anyone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pacsmesh.node.errors import PacsmeshError

# modality: DICOM TLS client only; it opens nothing on the gRPC API
ROLES = ("node", "operator", "reader", "modality")
ORGANIZATION = "pacsmesh"
CA_DAYS = 3650
CERT_DAYS_DEFAULT = 825  # the longest leaf lifetime browsers still accept; rotate before
# A node name is a DNS label (it is checked as a host name in TLS): lower case,
# digits and hyphens. Operator and reader names are free text within reason.
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
CLOCK_SLACK = dt.timedelta(minutes=5)  # valid from a little before now: skewed peers


class PkiError(PacsmeshError):
    """A CA operation could not be done; the message says what and why."""


@dataclass(frozen=True)
class Identity:
    """Who is calling, as its certificate says."""

    name: str  # CN: the node id, or the operator's name
    role: str  # node | operator | reader
    serial: int

    @property
    def subject(self) -> str:
        return f"{self.role}:{self.name}"


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The principal a cluster certificate names, or None if it names none."""
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        return None
    role, name = str(ous[0].value), str(cns[0].value)
    if role not in ROLES:
        return None
    return Identity(name=name, role=role, serial=cert.serial_number)


def identity_of_pem(pem: bytes) -> Identity | None:
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the start: never world-readable, not even for a moment."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ca_paths(directory: Path) -> tuple[Path, Path]:
    return directory / "ca.pem", directory / "ca.key"


def init_ca(directory: Path, name: str = "pacsmesh cluster CA") -> Path:
    """Creates DIR/ca.pem and DIR/ca.key. Refuses to overwrite an existing CA: every
    certificate of the federation hangs on that key."""
    cert_path, key_path = ca_paths(directory)
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"{directory} already holds a CA ({cert_path.name}); refusing to "
                       "overwrite it: every certificate of the federation depends on it")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SLACK)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    _write_crl(directory, cert, key, set())  # nodes can point [tls] crl at it from day one
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_paths(directory)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {directory} (run `pacsmesh ca init --dir {directory}`): "
                       f"{exc.filename} is missing") from exc
    except ValueError as exc:
        raise PkiError(f"the CA in {directory} cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC key")
    return cert, key


def _san(name: str, role: str, hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in ([name] if role == "node" else []) + hosts:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})", host):
                raise PkiError(f"--host {host!r} is neither an IP address nor a DNS name"
                               ) from None
            names.append(x509.DNSName(host))
    return names


def issue(directory: Path, name: str, role: str, hosts: list[str] | None = None,
          days: int = CERT_DAYS_DEFAULT, force: bool = False) -> tuple[Path, Path]:
    """DIR/NAME.pem and DIR/NAME.key, signed by the CA in DIR. `force` replaces an
    existing pair (rotation: issue anew, deploy, then revoke the old serial)."""
    if role not in ROLES:
        raise PkiError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    pattern = NODE_NAME if role == "node" else CLIENT_NAME
    if not pattern.fullmatch(name):
        what = ("a node name is its node id and a DNS label: lower-case letters, digits "
                "and hyphens, at most 63" if role == "node"
                else "letters, digits, space, '.', '_', '@', '-', at most 128")
        raise PkiError(f"certificate name {name!r} is not valid: {what}")
    if days < 1:
        raise PkiError("--days must be at least 1")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise PkiError(f"{cert_path} already exists; pass --force to replace it (then "
                       "revoke the old one)")
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "node":  # a node also serves; clients never do
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SLACK)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    sans = _san(name, role, list(hosts or []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def crl_path(directory: Path) -> Path:
    return directory / "crl.pem"


def revoke(directory: Path, what: str) -> int:
    """Adds a certificate (DIR/WHAT.pem, or a hex serial) to DIR/crl.pem, re-signed.
    Returns the serial revoked."""
    ca_cert, ca_key = _load_ca(directory)
    pem = directory / f"{what}.pem"
    if pem.exists():
        serial = x509.load_pem_x509_certificate(pem.read_bytes()).serial_number
    else:
        try:
            serial = int(what.replace(":", ""), 16)
        except ValueError:
            raise PkiError(f"{what!r} is neither a certificate in {directory} nor a hex "
                           "serial") from None
    if serial <= 0:
        raise PkiError(f"{what!r}: a certificate serial is a positive number")
    revoked = revoked_serials_in(directory)
    revoked.add(serial)
    _write_crl(directory, ca_cert, ca_key, revoked)
    return serial


def _write_crl(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
               revoked: set[int]) -> None:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - CLOCK_SLACK)
               .next_update(now + dt.timedelta(days=CA_DAYS)))
    for s in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_public(crl_path(directory), crl.public_bytes(serialization.Encoding.PEM))


def revoked_serials_in(directory: Path) -> set[int]:
    path = crl_path(directory)
    if not path.exists():
        return set()
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return {r.serial_number for r in crl}


def read_crl(path: Path, ca_pem: bytes) -> set[int]:
    """The serials a CRL revokes, after checking the cluster CA signed it: a CRL anyone
    could write would let anyone lock members out."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read CRL {path}: {exc}") from exc
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise PkiError(f"CRL {path} is not signed by the cluster CA")
    return {r.serial_number for r in crl}


def chain_problem(cert_pem: bytes, ca_pem: bytes) -> str | None:
    """Why a certificate would not be accepted by the cluster, or None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        return f"not a PEM certificate: {exc}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by this cluster's CA (ca_cert)"
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return (f"valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d}")
    return None
