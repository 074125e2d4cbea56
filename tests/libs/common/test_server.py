"""The shared bootstrap: health, reflection, RPC metrics, typed errors as status codes."""

import urllib.parse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from libs.common import server as bootstrap
from libs.common.errors import MAX_DETAILS_BYTES, InvalidArgument, Problems, details, grpc_errors
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc


class _Adapters(serving_pb2_grpc.AdapterServiceServicer):
    @grpc_errors
    def LoadAdapter(self, request, context):
        raise InvalidArgument("must not be empty", field="name")

    @grpc_errors
    def ListAdapters(self, request, context):
        return serving_pb2.ListAdaptersResponse(adapters=[serving_pb2.Adapter(name="a")])


@pytest.fixture(scope="module")
def server_address():
    def register(server):
        serving_pb2_grpc.add_AdapterServiceServicer_to_server(_Adapters(), server)
        return [serving_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name]

    server, port, health = bootstrap.create_server("127.0.0.1:0", register, "testsvc")
    yield f"127.0.0.1:{port}", health
    server.stop(0)


def test_health_reports_serving_for_each_service(server_address):
    address, _ = server_address
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tuneforge.serving.v1.AdapterService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server_address):
    address, _ = server_address
    with grpc.insecure_channel(address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"tuneforge.serving.v1.AdapterService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_typed_error_becomes_its_status_code_and_is_counted(server_address):
    address, _ = server_address
    with grpc.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.AdapterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadAdapter(serving_pb2.LoadAdapterRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "name: must not be empty"
        assert [a.name for a in stub.ListAdapters(serving_pb2.ListAdaptersRequest()).adapters] == ["a"]
    labels = {"method": "LoadAdapter", "code": "INVALID_ARGUMENT"}
    assert REGISTRY.get_sample_value("tuneforge_testsvc_grpc_requests_total", labels) == 1
    assert REGISTRY.get_sample_value("tuneforge_testsvc_grpc_requests_total", {"method": "ListAdapters", "code": "OK"}) == 1


def test_status_details_are_cut_to_fit_the_trailers():
    short = Problems(["task: expected one of sft, pt; got 'x'"])
    assert details(short) == str(short)
    huge = Problems([f"task: expected one of sft, pt; got {'é' * 60000!r}", "format: expected one of auto; got 'y'"])
    cut = details(huge)
    encoded = urllib.parse.quote(cut.encode("utf-8"), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")  # grpc-message's
    assert cut.startswith("task: expected one of sft, pt; got 'ééé") and cut.endswith(" more characters)")
    assert len(encoded) <= MAX_DETAILS_BYTES
    assert int(cut.rsplit("(", 1)[1].split()[0]) == len(str(huge)) - len(cut.rsplit(" ... (", 1)[0])


def test_graceful_shutdown_flips_health(server_address):
    address, health = server_address
    health.enter_graceful_shutdown()
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
