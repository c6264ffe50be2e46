"""Test certificates, made at test time: a CA, a broker certificate, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Pki", "make_pki"]

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Pki:
    """PEM files in one folder; `other_ca` signed nothing here (a CA the broker is not from)."""

    ca: Path
    other_ca: Path
    broker_cert: Path
    broker_key: Path
    client_cert: Path
    client_key: Path
    client_name: str
    stranger_cert: Path  # a client certificate from `other_ca`
    stranger_key: Path
    impostor_cert: Path  # a broker certificate (localhost, 127.0.0.1) from `other_ca`
    impostor_key: Path
    misnamed_cert: Path  # a broker certificate from `ca` for another name only
    misnamed_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    common_name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_alt_name(name) for name in names]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_pki(folder: Path, *, client_name: str = "oak-agent-test") -> Pki:
    """A fresh CA with a broker certificate (localhost, 127.0.0.1) and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("oak test CA")
    other_key, other_cert = _ca("some other CA")
    broker_key, broker_cert = _leaf("localhost", ca_key, ca_cert, server=True)
    client_key, client_cert = _leaf(client_name, ca_key, ca_cert, server=False)
    stranger_key, stranger_cert = _leaf(client_name, other_key, other_cert, server=False)
    impostor_key, impostor_cert = _leaf("localhost", other_key, other_cert, server=True)
    misnamed_key, misnamed_cert = _leaf(
        "broker.invalid", ca_key, ca_cert, server=True, names=("broker.invalid",)
    )
    return Pki(
        ca=_write_cert(ca_cert, folder / "ca.pem"),
        other_ca=_write_cert(other_cert, folder / "other-ca.pem"),
        broker_cert=_write_cert(broker_cert, folder / "broker.crt"),
        broker_key=_write_key(broker_key, folder / "broker.key"),
        client_cert=_write_cert(client_cert, folder / "agent.crt"),
        client_key=_write_key(client_key, folder / "agent.key"),
        client_name=client_name,
        stranger_cert=_write_cert(stranger_cert, folder / "stranger.crt"),
        stranger_key=_write_key(stranger_key, folder / "stranger.key"),
        impostor_cert=_write_cert(impostor_cert, folder / "impostor.crt"),
        impostor_key=_write_key(impostor_key, folder / "impostor.key"),
        misnamed_cert=_write_cert(misnamed_cert, folder / "misnamed.crt"),
        misnamed_key=_write_key(misnamed_key, folder / "misnamed.key"),
    )
