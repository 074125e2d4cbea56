"""`tuneforge health HOST:PORT [--service NAME]`: one gRPC health Check, exit 0 when SERVING (the images' check).
Over TLS (and mutual TLS) with the same client flags and environment as the services' own calls."""

from __future__ import annotations

import argparse
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common import channels
from libs.common.errors import Problems, TuneForgeError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge health", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of a TuneForge gRPC server")
    parser.add_argument("--service", default="", help="the health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls_ca", default=None,
                        help=f"PEM CA certificates to trust: check over TLS (env {channels.ENV_CA}); unset: plaintext")
    parser.add_argument("--tls_client_cert", default=None,
                        help=f"PEM certificate to present to a server requiring mutual TLS (env {channels.ENV_CERT})")
    parser.add_argument("--tls_client_key", default=None, help=f"PEM private key of --tls_client_cert (env {channels.ENV_KEY})")
    args = parser.parse_args(argv)
    saved = {env: os.environ.get(env) for env in (channels.ENV_CA, channels.ENV_CERT, channels.ENV_KEY)}
    try:
        channels.configure(args.tls_ca, args.tls_client_cert, args.tls_client_key)
        channel = channels.open_channel(args.address)
    except Problems as exc:
        parser.error("; ".join(f"--{p}" for p in exc.problems))
    except TuneForgeError as exc:  # an unreadable or non-PEM file, named by its flag
        parser.error(f"--{exc.field}: {exc.message}" if exc.field else exc.message)
    finally:  # the flags are this check's, not the environment of whoever called main()
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
