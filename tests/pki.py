"""Certificates for the engine-wire tests: a CA, vnicd's and the engine's, an intruder's, and
an expired one from the right CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair
    engine: Pair
    other_ca: Path
    intruder: Pair  # signed by other_ca
    expired: Pair  # signed by ca, valid until yesterday


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vnicd-tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    age: datetime.timedelta = datetime.timedelta(0),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC) - age
    issuer_name, issuer_key = issuer or (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(directory: Path, cn: str) -> tuple[Path, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"{cn}.pem"
    _write_cert(_cert(cn, key, None), path)
    return path, _name(cn), key


def _leaf(
    directory: Path,
    cn: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey],
    age: datetime.timedelta = datetime.timedelta(0),
) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    pair = Pair(directory / f"{cn}-cert.pem", directory / f"{cn}-key.pem")
    _write_cert(_cert(cn, key, issuer, age), pair.cert)
    _write_key(key, pair.key)
    return pair


def make(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_name, ca_key = _ca(directory, "test-ca")
    other, other_name, other_key = _ca(directory, "other-ca")
    return Pki(
        ca=ca,
        server=_leaf(directory, "vnicd-host", (ca_name, ca_key)),
        engine=_leaf(directory, "engine", (ca_name, ca_key)),
        other_ca=other,
        intruder=_leaf(directory, "intruder", (other_name, other_key)),
        expired=_leaf(directory, "expired", (ca_name, ca_key), datetime.timedelta(days=2)),
    )


def at(directory: Path) -> Pki:
    """The files :func:`make` wrote in ``directory``."""

    def pair(cn: str) -> Pair:
        return Pair(directory / f"{cn}-cert.pem", directory / f"{cn}-key.pem")

    return Pki(
        ca=directory / "test-ca.pem",
        server=pair("vnicd-host"),
        engine=pair("engine"),
        other_ca=directory / "other-ca.pem",
        intruder=pair("intruder"),
        expired=pair("expired"),
    )
