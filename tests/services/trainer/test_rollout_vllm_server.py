"""The server-mode generator's refusals that need no serving process (fast): a full policy
names --vllm_mode, and nothing listening at the address names the flags to check, within the
connect wait. Generation and LoRA sync against the session's serving process are in
tests/services/serving/test_serving_rollout.py."""

from __future__ import annotations

import socket
import time

import pytest

from libs.common.errors import FailedPrecondition, Unavailable
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
        "--vllm_server_port (the serving process's admin gRPC port, `tuneforge deploy --grpc_port`, not its HTTP "
        "port), and that `tuneforge deploy` runs there")
