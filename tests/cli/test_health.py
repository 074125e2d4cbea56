"""`tuneforge health HOST:PORT`, the images' health check: exit 0 only when the server says SERVING."""

from __future__ import annotations

import os
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


def test_health_over_tls_and_mutual_tls_with_the_client_flags(tmp_path, capsys, monkeypatch):
    from libs.common import channels, tls
    from tests import tls_certs

    for env in (channels.ENV_CA, channels.ENV_CERT, channels.ENV_KEY):
        monkeypatch.delenv(env, raising=False)
    files = tls_certs.make(tmp_path / "tls")
    server, port, _ = create_server("127.0.0.1:0", lambda s: [], "dataprep",
                                    tls_config=tls.ServerTLS(files.server_cert, files.server_key, client_ca=files.ca))
    address = f"127.0.0.1:{port}"
    try:
        assert main(["health", address, "--timeout", "2"]) == 1  # plaintext to a TLS port
        assert capsys.readouterr().out.startswith(f"{address}: UNAVAILABLE: ")
        assert main(["health", address, "--timeout", "2", "--tls_ca", files.ca]) == 1  # no client certificate
        assert capsys.readouterr().out.startswith(f"{address}: UNAVAILABLE: ")
        assert main(["health", address, "--tls_ca", files.ca, "--tls_client_cert", files.client_cert,
                     "--tls_client_key", files.client_key]) == 0
        assert capsys.readouterr().out == f"{address}: SERVING\n"
        # the flags do not leak into the caller's environment
        assert channels.ENV_CA not in os.environ
    finally:
        server.stop(0).wait()


def test_health_names_the_flag_of_a_bad_tls_file_without_a_traceback(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["health", "127.0.0.1:1", "--tls_ca", str(tmp_path / "missing.pem")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--tls_ca: cannot read {tmp_path / 'missing.pem'}" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["health", "127.0.0.1:1", "--tls_client_cert", str(tmp_path / "c.pem")])
    assert "--tls_client_cert and tls_client_key: give both or neither" in capsys.readouterr().err
