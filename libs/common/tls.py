"""TLS material for our gRPC servers and clients: reads the PEM files named by the
--tls_* flags once, at start, and fails naming the flag when one cannot be used."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import grpc

from libs.common.errors import FailedPrecondition, InvalidArgument, Problems


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of a PEM file; a missing, unreadable or non-PEM file is an error naming `flag`."""
    try:
        data = pathlib.Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {path}: {exc.strerror}", field=flag) from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{path} is not a PEM file (no -----BEGIN line)", field=flag)
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key; with `client_ca`, clients must present a
    certificate it signed (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key, "tls_key"), read_pem(self.cert, "tls_cert"))
        client_ca = read_pem(self.client_ca, "tls_client_ca") if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def server_tls(cert: str | None, key: str | None, client_ca: str | None) -> ServerTLS | None:
    """The server's TLS from its flags: None when neither --tls_cert nor --tls_key is given."""
    problems = []
    if bool(cert) != bool(key):
        problems.append("tls_cert and tls_key: give both or neither" +
                        (f" (tls_cert is {cert})" if cert else f" (tls_key is {key})"))
    if client_ca and not cert:
        problems.append("tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS first)")
    if problems:
        raise Problems(problems)
    return ServerTLS(cert, key, client_ca or None) if cert else None


def server_problems(cert: str | None, key: str | None, client_ca: str | None) -> list[str]:
    """server_tls's problems as config problems (reported with the other flags')."""
    try:
        server_tls(cert, key, client_ca)
    except Problems as exc:
        return exc.problems
    return []
