"""The one place our processes open gRPC channels to each other: plaintext, or TLS
(and mutual TLS) from the client flags --tls_ca, --tls_client_cert, --tls_client_key,
and a bearer key for servers that require one (serving's admin service).

The client TLS settings are per process and travel in the environment
(TUNEFORGE_TLS_CA, TUNEFORGE_TLS_CLIENT_CERT, TUNEFORGE_TLS_CLIENT_KEY): `configure`
sets them from a service's flags, so the processes it starts (training workers, torchrun
ranks) reach the same peers the same way; a CLI user exports them once. A client of
serving's admin services sends its key (its flag, else TUNEFORGE_API_KEY: admin_api_key)."""

from __future__ import annotations

import os

import grpc

from libs.common import auth, tls
from libs.common.errors import Problems

ENV_CA = "TUNEFORGE_TLS_CA"
ENV_CERT = "TUNEFORGE_TLS_CLIENT_CERT"
ENV_KEY = "TUNEFORGE_TLS_CLIENT_KEY"
ENV_API_KEY = "TUNEFORGE_API_KEY"
_FLAGS = {ENV_CA: "tls_ca", ENV_CERT: "tls_client_cert", ENV_KEY: "tls_client_key"}


def client_problems(tls_ca: str | None, tls_client_cert: str | None, tls_client_key: str | None) -> list[str]:
    """What is wrong with a combination of client flags (all of it at once)."""
    found = []
    if bool(tls_client_cert) != bool(tls_client_key):
        found.append("tls_client_cert and tls_client_key: give both or neither")
    if tls_client_cert and not tls_ca:
        found.append("tls_client_cert: needs tls_ca (a client certificate is sent over TLS only)")
    return found


def configure(tls_ca: str | None = None, tls_client_cert: str | None = None,
              tls_client_key: str | None = None) -> None:
    """Makes this process (and those it starts) open TLS channels with these files; flags
    left unset keep what the environment already says."""
    found = client_problems(tls_ca or os.environ.get(ENV_CA), tls_client_cert or os.environ.get(ENV_CERT),
                            tls_client_key or os.environ.get(ENV_KEY))
    if found:
        raise Problems(found)
    for env, value in ((ENV_CA, tls_ca), (ENV_CERT, tls_client_cert), (ENV_KEY, tls_client_key)):
        if value:
            os.environ[env] = value


def credentials() -> grpc.ChannelCredentials | None:
    """TLS channel credentials from the environment; None for plaintext (no TUNEFORGE_TLS_CA)."""
    ca = os.environ.get(ENV_CA)
    if not ca:
        return None
    found = client_problems(ca, os.environ.get(ENV_CERT), os.environ.get(ENV_KEY))
    if found:
        raise Problems([f"{problem} ({ENV_CERT}, {ENV_KEY})" for problem in found])
    cert, key = os.environ.get(ENV_CERT), os.environ.get(ENV_KEY)
    return grpc.ssl_channel_credentials(
        root_certificates=tls.read_pem(ca, _FLAGS[ENV_CA]),
        private_key=tls.read_pem(key, _FLAGS[ENV_KEY]) if key else None,
        certificate_chain=tls.read_pem(cert, _FLAGS[ENV_CERT]) if cert else None)


def admin_api_key(api_key: str | None = None) -> str | None:
    """The key a client of serving's admin services sends: its own flag, else TUNEFORGE_API_KEY."""
    return api_key or os.environ.get(ENV_API_KEY) or None


def open_channel(address: str, options: list | None = None, api_key: str | None = None) -> grpc.Channel:
    """A sync channel to `address`, TLS when configured, sending `api_key` as
    `authorization: Bearer KEY` on every call when given. Only clients of a keyed service
    pass one (`admin_api_key()`): the key is not sent to services that do not ask for it."""
    creds = credentials()
    channel = (grpc.secure_channel(address, creds, options=options) if creds is not None
               else grpc.insecure_channel(address, options=options))
    return grpc.intercept_channel(channel, auth.BearerKeyClient(api_key)) if api_key else channel


def open_aio_channel(address: str, options: list | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address`, TLS when configured."""
    creds = credentials()
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.aio.insecure_channel(address, options=options)
