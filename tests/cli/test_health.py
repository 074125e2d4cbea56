"""`tuneforge health HOST:PORT`, the images' health check: exit 0 only when the server says SERVING."""

from __future__ import annotations

import socket

from grpc_health.v1 import health_pb2

from cli.main import main
from libs.common.server import create_server


def test_health_exits_0_on_serving_and_1_on_not_serving_with_the_status_printed(capsys):
    # Named as a real service: a new name would register tuneforge_<name>_grpc_* in the process's
    # registry, which tests/deploy/test_metrics_catalogue.py (same pytest process) checks against the docs.
    server, port, health = create_server("127.0.0.1:0", lambda s: [], "dataprep")
    try:
        assert main(["health", f"127.0.0.1:{port}"]) == 0
        assert capsys.readouterr().out == f"127.0.0.1:{port}: SERVING\n"
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert main(["health", f"127.0.0.1:{port}"]) == 1
        assert capsys.readouterr().out == f"127.0.0.1:{port}: NOT_SERVING\n"
        assert main(["health", f"127.0.0.1:{port}", "--service", "nope"]) == 1
        assert capsys.readouterr().out.startswith(f"127.0.0.1:{port}: NOT_FOUND: ")
    finally:
        server.stop(0).wait()


def test_health_of_a_closed_port_exits_1_naming_unavailable(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["health", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"127.0.0.1:{port}: UNAVAILABLE: "), out
