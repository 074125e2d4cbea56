"""64 watch streams held open at once on a real trainer server (serving replicas following
its checkpoints): health checks and unary RPCs answer promptly meanwhile; the 65th watch,
WatchJob as WatchCheckpoints, is refused with RESOURCE_EXHAUSTED naming the flag."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from libs.common.server import create_server
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from services.trainer.config import TrainerServerConfig
from services.trainer.jobs import JobManager
from services.trainer.servicer import register

REFUSAL = ("all 64 stream slots of this trainer server are taken (--max_streams 64); retry when a stream "
           "ends, or run the server with a larger --max_streams")


def streams_open(method):
    return REGISTRY.get_sample_value("tuneforge_trainer_grpc_streams_open", {"method": method})


def wait_for(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def address():
    config = TrainerServerConfig()
    assert config.max_streams == 64  # the default serves the 64 watchers
    jobs = JobManager(max_concurrent_jobs=config.max_concurrent_jobs, torch_threads=1)
    server, port, _health = create_server("127.0.0.1:0", lambda s: register(s, jobs), "trainer",
                                          config.max_streams, config.unary_threads)
    yield f"127.0.0.1:{port}"
    jobs.shutdown()
    server.stop(1).wait()


def test_64_watchers_leave_health_and_unary_rpcs_answering(address):
    refused_before = REGISTRY.get_sample_value("tuneforge_trainer_grpc_streams_refused_total", {"method": "WatchJob"})
    channels = [grpc.insecure_channel(address) for _ in range(64)]
    watches = [trainer_pb2_grpc.TrainerServiceStub(c).WatchCheckpoints(pb.WatchCheckpointsRequest(), timeout=60)
               for c in channels]
    try:
        wait_for(lambda: streams_open("WatchCheckpoints") == 64, "64 WatchCheckpoints streams never all started")
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            started = time.perf_counter()
            for _ in range(10):
                assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            assert list(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == []
            answered = time.perf_counter() - started
            print(f"under 64 watch streams: 10 Health/Check + ListJobs in {answered * 1e3:.1f} ms")
            assert answered < 2

            for method, request in (("WatchCheckpoints", pb.WatchCheckpointsRequest()),
                                    ("WatchJob", pb.WatchJobRequest(id="nope"))):
                started = time.perf_counter()
                with pytest.raises(grpc.RpcError) as caught:
                    next(getattr(stub, method)(request, timeout=10))
                assert time.perf_counter() - started < 2
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert caught.value.details() == f"{method}: {REFUSAL}"
            assert REGISTRY.get_sample_value("tuneforge_trainer_grpc_streams_refused_total",
                                             {"method": "WatchJob"}) == refused_before + 1

            watches.pop().cancel()  # a follower that leaves gives its slot back
            wait_for(lambda: streams_open("WatchCheckpoints") == 63, "the cancelled watch kept its slot")
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.WatchJob(pb.WatchJobRequest(id="nope"), timeout=10))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # served now: the job is unknown
    finally:
        for watch in watches:
            watch.cancel()
        for channel in channels:
            channel.close()
    wait_for(lambda: streams_open("WatchCheckpoints") == 0, "slots still taken after every watcher left")
