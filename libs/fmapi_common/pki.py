"""A private certificate authority for fmapi's internal mutual TLS (development and tests).

``fmapi dev up`` and the tests call :func:`ensure_pki`: a CA and one certificate per service
identity under one directory, created when missing and re-issued when they near expiry or no
longer chain to the CA, so nobody rotates anything by hand. A production deployment mounts its
own certificates (e.g. issued by cert-manager) with the same identities; nothing else here is
needed there.

A service's identity is its certificate's subject common name (``gateway``, ``routing``, ...);
every certificate also names the identity as a DNS subject alternative name (what clients verify
a server against) plus ``localhost``/``127.0.0.1``/``::1``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tls import IDENTITIES

CA_DAYS = 3650
LEAF_DAYS = 365
# Re-issue a leaf certificate when less than this is left.
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertPaths:
    """Where one identity's certificate, key and the CA that signed it live."""

    ca: Path
    cert: Path
    key: Path


def paths(directory: str | Path, name: str) -> CertPaths:
    d = Path(directory)
    return CertPaths(d / "ca.pem", d / f"{name}.pem", d / f"{name}-key.pem")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE * 12:
        return None
    return cert, key  # type: ignore[return-value]


def _new_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fmapi internal CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca-key.pem", _key_pem(key))
    _write_public(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _leaf_ok(p: CertPaths, ca: x509.Certificate, name: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(p.cert.read_bytes())
        serialization.load_pem_private_key(p.key.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - any failure means re-issue
        return False
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(cn) and cn[0].value == name and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def issue(
    directory: str | Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    dns_names: tuple[str, ...] = (),
    days: int = LEAF_DAYS,
) -> CertPaths:
    """Write a certificate for identity ``name`` signed by ``ca`` (server and client use)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [
        x509.DNSName(n) for n in dict.fromkeys((name, *dns_names, "localhost"))
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    p = paths(directory, name)
    _write_private(p.key, _key_pem(key))
    _write_public(p.cert, cert.public_bytes(serialization.Encoding.PEM))
    return p


def ensure_pki(directory: str | Path, names: tuple[str, ...] = IDENTITIES) -> dict[str, CertPaths]:
    """The CA and a valid certificate for every name in ``directory`` (mode 0700), made as needed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca = _load_ca(d) or _new_ca(d)
    out = {}
    for name in names:
        p = paths(d, name)
        out[name] = p if _leaf_ok(p, ca[0], name) else issue(d, name, ca)
    return out


def load_ca(directory: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in ``directory`` (made by :func:`ensure_pki`), e.g. to issue a test certificate."""
    ca = _load_ca(Path(directory))
    if ca is None:
        raise FileNotFoundError(f"no usable CA in {directory}")
    return ca
