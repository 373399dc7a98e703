"""A private certificate authority and the SuperLink's TLS certificate.

A federation of a few banks and hospitals does not need (and often cannot get)
a public WebPKI certificate for an internal host: the operator runs a tiny CA,
hands `ca.pem` to every site out of band, and the sites' SuperNodes verify the
SuperLink against it (`--root-certificates`). Keys are written owner-only.
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

DEFAULT_SANS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    """Where `create_certificates` put each file; the names match the SuperLink's TLS flags."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def create_certificates(
    out_dir: Path,
    sans: list[str] | tuple[str, ...] = DEFAULT_SANS,
    *,
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Create `ca.pem`/`ca.key` and a server certificate `server.pem`/`server.key` signed by it.

    Every host name or IP that sites will dial must be in `sans`: TLS clients
    check the subject alternative names, not the common name.
    """
    if not sans:
        raise ValueError("at least one --san (the host name or IP sites connect to) is required")
    # The SuperLink's own SuperExec (which starts each run's ServerApp) dials it on 127.0.0.1 with the same
    # certificate: without loopback names every run stays "starting" ("IP address mismatch" in its log).
    sans = [*sans, *(s for s in DEFAULT_SANS if s not in sans)]
    if days < 1:
        raise ValueError(f"--days {days} would issue a certificate that is already expired; give at least 1 day")
    out_dir = Path(out_dir)
    paths = CertPaths(out_dir / "ca.pem", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key")
    existing = [p for p in (paths.ca_cert, paths.server_cert) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --force to replace the CA and server certificate")
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)  # tolerate small clock skew between operator and sites

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedtune federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_private(paths.server_key, _pem_key(server_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def certificate_sans(path: Path) -> list[str]:
    """The subject alternative names in a PEM certificate (to show the operator what sites may dial)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]
