"""A throwaway certificate authority for the TLS tests: a CA, a server certificate for
127.0.0.1 and localhost, and a client certificate, each signed by the CA, as PEM files."""

from __future__ import annotations

import datetime
import pathlib
from dataclasses import dataclass
from ipaddress import ip_address

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed none of these: trusting only it must fail


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: pathlib.Path, certificate: x509.Certificate, key=None) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(common_name: str, ca_cert, ca_key, usage, names=()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make(directory: pathlib.Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("TuneForge test CA")
    server_cert, server_key = _leaf("tuneforge-test-server", ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                                    [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))])
    client_cert, client_key = _leaf("tuneforge-test-client", ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    other_cert, _ = _ca("Some other CA")
    _write(directory / "ca.pem", ca_cert)
    _write(directory / "server.pem", server_cert, server_key)
    _write(directory / "client.pem", client_cert, client_key)
    _write(directory / "other-ca.pem", other_cert)
    return TlsFiles(ca=str(directory / "ca.pem"), server_cert=str(directory / "server.pem"),
                    server_key=str(directory / "server.key"), client_cert=str(directory / "client.pem"),
                    client_key=str(directory / "client.key"), other_ca=str(directory / "other-ca.pem"))
