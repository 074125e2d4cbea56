"""The serving admin port as `tuneforge deploy` builds it from its flags (server.admin_keys,
the TLS flags) around the real AdapterService and registry, without an engine (nothing
here loads): --api_key guards it unless --admin_api_key is given, which then is the only
key; a refused call never reaches the registry; health stays open; flags checked at once."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common import channels, tls
from libs.common import config as cfg
from libs.common.errors import InvalidArgument, Problems, Unauthenticated
from libs.serving.client import ServingClient
from libs.common.server import create_server
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving.adapters import AdapterRegistry
from services.serving.admin import AdapterService, registrar
from services.serving.config import DeployConfig
from services.serving.rollout import RolloutService
from services.serving.rollout import registrar as rollout_registrar
from services.serving.server import admin_keys


@pytest.fixture
def admin_port(default_model):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = []

    def start(argv: list[str]) -> str:
        config = cfg.parse(DeployConfig, argv)
        registry = AdapterRegistry(None, default_model, "base", config.max_lora_rank)
        # as serving's process builds its admin port: adapters and rollouts, neither reached here without the key
        admin, rollout = registrar(AdapterService(registry, loop)), rollout_registrar(RolloutService(None, loop))
        server, port, _ = create_server(
            "127.0.0.1:0", lambda server: [*admin(server), *rollout(server)], "serving",
            tls_config=tls.server_tls(config.tls_cert, config.tls_key, config.tls_client_ca), keys=admin_keys(config))
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _code(address: str, call: str, api_key: str | None = None, **fields) -> grpc.StatusCode:
    with channels.open_channel(address, api_key=api_key) as channel:
        stub = serving_pb2_grpc.AdapterServiceStub(channel)
        request = getattr(serving_pb2, f"{call}Request")(**fields)
        try:
            getattr(stub, call)(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_api_key_guards_the_admin_port_unless_admin_api_key_is_given(admin_port, monkeypatch):
    monkeypatch.delenv(channels.ENV_API_KEY, raising=False)
    monkeypatch.delenv(channels.ENV_CA, raising=False)
    open_port = admin_port([])
    assert _code(open_port, "ListAdapters") == grpc.StatusCode.OK
    shared = admin_port(["--api_key", "http-key"])
    assert _code(shared, "ListAdapters") == grpc.StatusCode.UNAUTHENTICATED
    # refused before the registry: with no engine a load that got through would fail otherwise
    assert _code(shared, "LoadAdapter", name="a", path="/nowhere") == grpc.StatusCode.UNAUTHENTICATED
    assert _code(shared, "UnloadAdapter", name="a") == grpc.StatusCode.UNAUTHENTICATED
    assert _code(shared, "ListAdapters", api_key="http-key") == grpc.StatusCode.OK
    assert _code(shared, "UnloadAdapter", api_key="http-key", name="a") == grpc.StatusCode.NOT_FOUND
    separate = admin_port(["--api_key", "http-key", "--admin_api_key", "admin-key"])
    assert _code(separate, "ListAdapters", api_key="http-key") == grpc.StatusCode.UNAUTHENTICATED
    assert _code(separate, "ListAdapters", api_key="admin-key") == grpc.StatusCode.OK
    with grpc.insecure_channel(separate) as channel:
        with pytest.raises(grpc.RpcError) as info:
            serving_pb2_grpc.AdapterServiceStub(channel).ListAdapters(
                serving_pb2.ListAdaptersRequest(), metadata=[("authorization", "Bearer http-key")], timeout=10)
        assert info.value.details() == "authorization: the bearer key is not this server's --admin_api_key"
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_admin_port_over_tls_with_a_key(admin_port, tls_files, monkeypatch):
    monkeypatch.setenv(channels.ENV_CA, tls_files.ca)
    monkeypatch.delenv(channels.ENV_API_KEY, raising=False)
    address = admin_port(["--admin_api_key", "k", "--tls_cert", tls_files.server_cert, "--tls_key", tls_files.server_key])
    assert _code(address, "ListAdapters") == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv(channels.ENV_API_KEY, "k")
    assert _code(address, "ListAdapters", api_key=channels.admin_api_key()) == grpc.StatusCode.OK
    monkeypatch.delenv(channels.ENV_CA)
    assert _code(address, "ListAdapters", api_key="k") == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port


def test_security_and_follow_flags_are_checked_at_once():
    with pytest.raises(Problems) as info:
        cfg.parse(DeployConfig, ["--admin_api_key", " ", "--tls_key", "k.pem", "--tls_client_cert", "c.pem",
                                 "--follow_jobs", "a=newest", "--follow_policy", "best"])
    assert info.value.problems == [
        "admin_api_key: must not be empty",
        "follow_jobs: 'a=newest': policy must be one of final, best, all; got 'newest'",
        "tls_cert and tls_key: give both or neither (tls_key is k.pem)",
        "tls_client_cert and tls_client_key: give both or neither",
        "tls_client_cert: needs tls_ca (a client certificate is sent over TLS only)"]
    with pytest.raises(Problems, match="follow_policy: expected one of final, best, all; got 'newest'"):
        cfg.parse(DeployConfig, ["--follow_policy", "newest"])
    config = cfg.parse(DeployConfig, [])
    assert (config.follow_policy, config.follow_jobs, config.admin_keys()) == ("final", [], [])


def test_push_and_rollouts_need_the_key_and_the_serving_client_sends_it(admin_port, monkeypatch):
    """PushAdapter and RolloutService.Generate (the trainer's --vllm_mode server) are refused
    without the key; libs.serving.client sends its own key, else TUNEFORGE_API_KEY."""
    monkeypatch.delenv(channels.ENV_API_KEY, raising=False)
    monkeypatch.delenv(channels.ENV_CA, raising=False)
    address = admin_port(["--api_key", "k"])
    assert _code(address, "PushAdapter", name="a") == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            serving_pb2_grpc.RolloutServiceStub(channel).Generate(serving_pb2.GenerateRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = ServingClient(address)
    try:
        client.wait_ready(10)
        with pytest.raises(Unauthenticated, match="authorization: missing"):
            client.push_adapter("a", {})
        with pytest.raises(Unauthenticated):
            client.generate("", [[1, 2]], [0], n=1, max_tokens=1, temperature=1.0)
    finally:
        client.close()
    with_flag = ServingClient(address, api_key="k")
    monkeypatch.setenv(channels.ENV_API_KEY, "k")
    from_env = ServingClient(address)
    for client in (with_flag, from_env):
        try:  # past the key: the push's own validation answers (no files)
            with pytest.raises(InvalidArgument):
                client.push_adapter("a", {})
        finally:
            client.close()
