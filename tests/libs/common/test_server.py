"""The shared bootstrap: health, reflection, RPC metrics, typed errors as status codes,
and the thread pool: stream slots refused beyond --max_streams, threads kept for unary calls."""

import threading
import time

import urllib.parse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from libs.common import server as bootstrap
from libs.common.errors import MAX_DETAILS_BYTES, InvalidArgument, Problems, details, grpc_errors
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from protos.tuneforge.trainer.v1 import trainer_pb2, trainer_pb2_grpc


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


# ---- stream slots and the thread pool ----------------------------------------------------

class _Watches(trainer_pb2_grpc.TrainerServiceServicer):
    """A stream that stays open until its client leaves, and a unary call that waits for `release`."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def WatchJob(self, request, context):
        yield trainer_pb2.WatchJobResponse(job=trainer_pb2.Job(id=request.id))
        while context.is_active():
            time.sleep(0.05)

    def GetJob(self, request, context):
        self.entered.release()
        self.release.wait(30)
        return trainer_pb2.GetJobResponse(job=trainer_pb2.Job(id=request.id))


@pytest.fixture
def small_server():
    """A server with 2 stream slots and 2 threads kept for unary calls (a pool of 4)."""
    watches = _Watches()

    def register(server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(watches, server)
        return ["tuneforge.trainer.v1.TrainerService"]

    server, port, _health = bootstrap.create_server("127.0.0.1:0", register, "slotsvc", max_streams=2,
                                                    unary_threads=2)
    channels = []

    def channel():
        channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return channels[-1]

    yield channel, watches
    watches.release.set()
    for c in channels:
        c.close()
    server.stop(0).wait()


def slot_metric(name, **labels):
    return REGISTRY.get_sample_value(f"tuneforge_slotsvc_grpc_{name}", labels)


def check_health(channel, timeout=5):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_stream_beyond_max_streams_is_refused_at_once_naming_the_flag(small_server):
    channel, _ = small_server
    refused_before = slot_metric("streams_refused_total", method="WatchJob")
    assert refused_before is not None  # declared at 0 when the server started
    assert slot_metric("streams_limit") == 2
    held = [trainer_pb2_grpc.TrainerServiceStub(channel()).WatchJob(trainer_pb2.WatchJobRequest(id=str(i)))
            for i in range(2)]
    assert [next(stream).job.id for stream in held] == ["0", "1"]
    assert slot_metric("streams_open", method="WatchJob") == 2

    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        next(trainer_pb2_grpc.TrainerServiceStub(channel()).WatchJob(trainer_pb2.WatchJobRequest(id="2"), timeout=10))
    refused_in = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == ("WatchJob: all 2 stream slots of this slotsvc server are taken "
                                      "(--max_streams 2); retry when a stream ends, or run the server with a "
                                      "larger --max_streams")
    assert refused_in < 2
    assert slot_metric("streams_refused_total", method="WatchJob") == refused_before + 1
    assert REGISTRY.get_sample_value("tuneforge_slotsvc_grpc_requests_total",
                                     {"method": "WatchJob", "code": "RESOURCE_EXHAUSTED"}) >= 1
    assert check_health(channel()).status == health_pb2.HealthCheckResponse.SERVING  # a unary thread is left

    held[0].cancel()  # a reader that leaves gives its slot back
    wait_until(lambda: slot_metric("streams_open", method="WatchJob") == 1)
    again = trainer_pb2_grpc.TrainerServiceStub(channel()).WatchJob(trainer_pb2.WatchJobRequest(id="3"))
    assert next(again).job.id == "3"
    for stream in (held[1], again):
        stream.cancel()
    wait_until(lambda: slot_metric("streams_open", method="WatchJob") == 0)


def test_health_watchers_take_no_thread(small_server):
    """Health/Watch sends from callbacks: many more watchers than threads, and Check still answers."""
    channel, _ = small_server
    watchers = [health_pb2_grpc.HealthStub(channel()).Watch(health_pb2.HealthCheckRequest(service=""))
                for _ in range(12)]
    assert {next(w, None).status for w in watchers} == {health_pb2.HealthCheckResponse.SERVING}
    assert slot_metric("streams_open", method="Watch") is None
    assert check_health(channel()).status == health_pb2.HealthCheckResponse.SERVING
    for watcher in watchers:
        watcher.cancel()


def test_streams_never_take_the_threads_kept_for_unary_calls(small_server):
    """With every stream slot held and more streams knocking, both unary threads still serve;
    a third unary call waits for one of them, not for a stream."""
    channel, watches = small_server
    stub = trainer_pb2_grpc.TrainerServiceStub(channel())
    held = [stub.WatchJob(trainer_pb2.WatchJobRequest(id=str(i))) for i in range(2)]
    for stream in held:
        next(stream)
    for i in range(3):
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.WatchJob(trainer_pb2.WatchJobRequest(id=f"extra{i}"), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    waiting = [stub.GetJob.future(trainer_pb2.GetJobRequest(id=str(i)), timeout=30) for i in range(3)]
    assert watches.entered.acquire(timeout=10) and watches.entered.acquire(timeout=10)
    assert not watches.entered.acquire(timeout=0.3)  # the third waits for a unary thread
    watches.release.set()
    assert [f.result(timeout=10).job.id for f in waiting] == ["0", "1", "2"]
    assert slot_metric("streams_open", method="WatchJob") == 2
    for stream in held:
        stream.cancel()
    wait_until(lambda: slot_metric("streams_open", method="WatchJob") == 0)


def test_server_options_must_leave_a_thread_for_each_kind():
    assert bootstrap.ServerOptions(max_streams=0, unary_threads=-1).problems() == [
        "max_streams: expected a positive number; got 0", "unary_threads: expected a positive number; got -1"]
    assert bootstrap.ServerOptions().problems() == []
