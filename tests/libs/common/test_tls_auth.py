"""TLS and bearer keys on the shared gRPC bootstrap, with certificates made in the test:
health and reflection over TLS, mutual TLS refusing a client without a certificate, clients
that trust another CA or speak plaintext refused, unusable files named by flag; a bearer key
required by the protected services (unary and streaming), health and reflection left open."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from libs.common import auth, channels, tls
from libs.common import server as bootstrap
from libs.common.errors import FailedPrecondition, InvalidArgument, Problems, grpc_errors
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from protos.tuneforge.trainer.v1 import trainer_pb2, trainer_pb2_grpc

ADAPTERS = serving_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
TRAINER = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class _Adapters(serving_pb2_grpc.AdapterServiceServicer):
    @grpc_errors
    def ListAdapters(self, request, context):
        return serving_pb2.ListAdaptersResponse(adapters=[serving_pb2.Adapter(name="a")])


class _Trainer(trainer_pb2_grpc.TrainerServiceServicer):
    @grpc_errors
    def WatchCheckpoints(self, request, context):
        yield trainer_pb2.WatchCheckpointsResponse(checkpoint=trainer_pb2.CheckpointEvent(step=3))


def _register(server):
    serving_pb2_grpc.add_AdapterServiceServicer_to_server(_Adapters(), server)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(_Trainer(), server)
    return [ADAPTERS, TRAINER]


@pytest.fixture
def start():
    servers = []

    def start(**kwargs) -> str:
        server, port, _health = bootstrap.create_server("127.0.0.1:0", _register, "tlstest", **kwargs)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def client_env(monkeypatch):
    """Sets the client TLS environment as `channels.configure` (the --tls_* client flags) does."""
    for env in (channels.ENV_CA, channels.ENV_CERT, channels.ENV_KEY, channels.ENV_API_KEY):
        monkeypatch.setenv(env, "")  # recorded first, so what configure sets is undone after the test
        monkeypatch.delenv(env)

    def set_env(ca=None, cert=None, key=None):
        channels.configure(ca, cert, key)

    return set_env


def _health(address: str, service: str = "") -> int:
    with channels.open_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _refused(address: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _health(address)
    return info.value


def test_tls_serves_health_and_reflection_to_a_client_trusting_its_ca(start, client_env, tls_files):
    address = start(tls_config=tls.ServerTLS(tls_files.server_cert, tls_files.server_key))
    client_env(ca=tls_files.ca)
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    assert _health(address, ADAPTERS) == health_pb2.HealthCheckResponse.SERVING
    with channels.open_channel(address) as channel:
        listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {ADAPTERS, TRAINER, "grpc.health.v1.Health"} <= listed
        reply = serving_pb2_grpc.AdapterServiceStub(channel).ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=5)
    assert [a.name for a in reply.adapters] == ["a"]


def test_tls_refuses_plaintext_clients_and_clients_trusting_another_ca(start, client_env, tls_files):
    address = start(tls_config=tls.ServerTLS(tls_files.server_cert, tls_files.server_key))
    assert _refused(address).code() == grpc.StatusCode.UNAVAILABLE  # plaintext: no TUNEFORGE_TLS_CA
    client_env(ca=tls_files.other_ca)
    assert _refused(address).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_the_client_ca_signed(start, client_env, tls_files):
    address = start(tls_config=tls.ServerTLS(tls_files.server_cert, tls_files.server_key, client_ca=tls_files.ca))
    client_env(ca=tls_files.ca)
    assert _refused(address).code() == grpc.StatusCode.UNAVAILABLE
    client_env(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    # a certificate signed by another CA than --tls_client_ca's is refused too: the server's own is one
    client_env(ca=tls_files.ca, cert=tls_files.server_cert, key=tls_files.server_key)
    address_other = start(tls_config=tls.ServerTLS(tls_files.server_cert, tls_files.server_key,
                                                   client_ca=tls_files.other_ca))
    assert _refused(address_other).code() == grpc.StatusCode.UNAVAILABLE


def test_unusable_tls_files_and_flag_combinations_are_named(start, client_env, tls_files, tmp_path):
    with pytest.raises(FailedPrecondition, match=r"^tls_cert: cannot read .*missing.pem: No such file or directory$"):
        start(tls_config=tls.ServerTLS(str(tmp_path / "missing.pem"), tls_files.server_key))
    (tmp_path / "key.txt").write_text("not a key\n")
    with pytest.raises(InvalidArgument, match=r"^tls_key: .*key.txt is not a PEM file"):
        start(tls_config=tls.ServerTLS(tls_files.server_cert, str(tmp_path / "key.txt")))
    with pytest.raises(Problems) as info:
        tls.server_tls(None, tls_files.server_key, tls_files.ca)
    assert info.value.problems == [f"tls_cert and tls_key: give both or neither (tls_key is {tls_files.server_key})",
                                   "tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS first)"]
    assert tls.server_tls(None, None, None) is None
    assert channels.client_problems(None, tls_files.client_cert, None) == [
        "tls_client_cert and tls_client_key: give both or neither",
        "tls_client_cert: needs tls_ca (a client certificate is sent over TLS only)"]
    client_env(ca=str(tmp_path / "nope.pem"))
    with pytest.raises(FailedPrecondition, match=r"^tls_ca: cannot read"):
        channels.open_channel("127.0.0.1:1")


def _list(address: str, api_key: str | None = None, metadata=None):
    with channels.open_channel(address, api_key=api_key) as channel:
        return serving_pb2_grpc.AdapterServiceStub(channel).ListAdapters(
            serving_pb2.ListAdaptersRequest(), timeout=5, metadata=metadata)


def _refusals() -> float:
    return REGISTRY.get_sample_value("tuneforge_tlstest_grpc_requests_total",
                                     {"method": "ListAdapters", "code": "UNAUTHENTICATED"}) or 0.0


def test_bearer_key_required_on_protected_services_health_and_reflection_open(start, client_env):
    address = start(keys=auth.BearerKeyInterceptor(["s3cret"], protected=[ADAPTERS], flag="--admin_api_key"))
    before = _refusals()
    with pytest.raises(grpc.RpcError) as info:
        _list(address)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _refusals() == before + 1  # counted by status like any other reply
    assert info.value.details() == ("authorization: missing; this server requires `authorization: Bearer KEY` "
                                    "metadata with the key given to its --admin_api_key")
    for metadata in ([("authorization", "Bearer wrong")], [("authorization", "s3cret")],
                     [("authorization", "Basic s3cret")], [("authorization", "Bearer s3cret2")]):
        with pytest.raises(grpc.RpcError) as info:
            _list(address, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert info.value.details() == "authorization: the bearer key is not this server's --admin_api_key"
    assert [a.name for a in _list(address, api_key="s3cret").adapters] == ["a"]
    assert [a.name for a in _list(address, metadata=[("authorization", "bearer  s3cret ")]).adapters] == ["a"]
    client_env()
    assert _health(address, ADAPTERS) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        assert ADAPTERS in ProtoReflectionDescriptorDatabase(channel).get_services()
        # a service the interceptor does not protect stays open
        (reply,) = trainer_pb2_grpc.TrainerServiceStub(channel).WatchCheckpoints(trainer_pb2.WatchCheckpointsRequest())
    assert reply.checkpoint.step == 3


def test_bearer_key_on_every_service_refuses_streams_too_and_reads_the_env_key(start, client_env, monkeypatch):
    address = start(keys=auth.BearerKeyInterceptor(["k1"]))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(trainer_pb2_grpc.TrainerServiceStub(channel).WatchCheckpoints(trainer_pb2.WatchCheckpointsRequest()))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    monkeypatch.setenv(channels.ENV_API_KEY, "k1")
    with channels.open_channel(address) as channel:  # the key goes only where the client asks for it
        with pytest.raises(grpc.RpcError) as info:
            list(trainer_pb2_grpc.TrainerServiceStub(channel).WatchCheckpoints(trainer_pb2.WatchCheckpointsRequest()))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert channels.admin_api_key() == "k1" and channels.admin_api_key("flag") == "flag"
    with channels.open_channel(address, api_key=channels.admin_api_key()) as channel:
        (reply,) = trainer_pb2_grpc.TrainerServiceStub(channel).WatchCheckpoints(trainer_pb2.WatchCheckpointsRequest())
    assert reply.checkpoint.step == 3


def test_keys_and_tls_together(start, client_env, tls_files):
    address = start(tls_config=tls.ServerTLS(tls_files.server_cert, tls_files.server_key),
                    keys=auth.BearerKeyInterceptor(["k"]))
    client_env(ca=tls_files.ca)
    with pytest.raises(grpc.RpcError) as info:
        _list(address)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [a.name for a in _list(address, api_key="k").adapters] == ["a"]
