"""The server-mode generator's refusals that need no serving process (fast): a full policy
names --vllm_mode, nothing listening at the address names the flags to check (and where the
port is found) within the connect wait, and an HTTP server there (serving's OpenAI port) is told apart at once. Generation and LoRA sync against the session's serving process are in
tests/services/serving/test_serving_rollout.py."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from libs.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.trainer.rollout import vllm_server
from services.trainer.rollout.vllm_server import ServerGenerator


def test_a_full_policy_is_refused_before_connecting():
    with pytest.raises(FailedPrecondition) as refused:
        ServerGenerator("127.0.0.1:1", job="job-rollout", base_model="/models/x", lora_rank=None)
    assert refused.value.field == "vllm_mode"
    assert refused.value.message == vllm_server.FULL_REFUSED
    assert "use --vllm_mode colocate or --train_type lora" in refused.value.message


def test_no_server_at_the_address_names_the_flags(monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(vllm_server, "CONNECT_SECONDS", 1.0)
    started = time.perf_counter()
    with pytest.raises(Unavailable) as refused:
        ServerGenerator(f"127.0.0.1:{port}", job="job-rollout", base_model="/models/x", lora_rank=8)
    assert time.perf_counter() - started < 5
    assert refused.value.field == "vllm_server_host"
    assert refused.value.message == (
        f"no serving service answers at 127.0.0.1:{port} (waited 1 s): check --vllm_server_host and "
        "--vllm_server_port (the serving process's admin gRPC port, not its HTTP port: `tuneforge deploy "
        "--grpc_port` (unset, a free port: the process prints it at start, `admin gRPC HOST:PORT`, and writes it "
        "to --ready_file as grpc_port; deploy/compose.yaml uses 50053)), and that `tuneforge deploy` runs there")


def test_an_http_port_is_refused_at_once_naming_the_port_flag(monkeypatch):
    """The flag's default (8000, TRL's) is serving's HTTP port: a user who gives only
    --vllm_server_host reaches the OpenAI API, which is told apart at once, not after the wait."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(vllm_server, "CONNECT_SECONDS", 30.0)
    port = server.server_address[1]
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidArgument) as refused:
            ServerGenerator(f"127.0.0.1:{port}", job="job-rollout", base_model="/models/x", lora_rank=8)
    finally:
        server.shutdown()
        server.server_close()
    assert time.perf_counter() - started < 5
    assert refused.value.field == "vllm_server_port"
    assert refused.value.message == (
        f"127.0.0.1:{port} answers HTTP (the serving process's OpenAI API?), not gRPC: --vllm_server_port is its "
        "admin gRPC port, `tuneforge deploy --grpc_port` (unset, a free port: the process prints it at start, "
        "`admin gRPC HOST:PORT`, and writes it to --ready_file as grpc_port; deploy/compose.yaml uses 50053)")
