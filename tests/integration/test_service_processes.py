"""Each service as its own process: health through the real stub, reflection
lists its service, /metrics answers, and SIGTERM drains (health flips to
NOT_SERVING for open watchers, the process exits 0)."""

import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cli.stack import Stack

SERVICES = {
    "dataprep": "tuneforge.dataprep.v1.DataprepService",
    "trainer": "tuneforge.trainer.v1.TrainerService",
    "serving": "tuneforge.serving.v1.AdapterService",
}


def _check(address: str, service: str) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {service, "grpc.health.v1.Health"} <= listed


@pytest.mark.parametrize("name", ["dataprep", "trainer"])
def test_process_serves_health_reflection_metrics_and_drains_on_sigterm(name, tmp_path):
    with Stack(tmp_path) as stack:
        process = stack.start(name, ["--metrics_port", "0", "--grace_period", "5"])
        _check(process.grpc_address, SERVICES[name])
        page = urllib.request.urlopen(f"http://127.0.0.1:{process.ready['metrics_port']}/metrics", timeout=5).read().decode()
        assert f"tuneforge_{name}_grpc_requests_total" in page

        with grpc.insecure_channel(process.grpc_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICES[name]))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            process.popen.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert process.popen.wait(timeout=20) == 0
        assert '"msg": "stopped"' in process.log_path.read_text()


@pytest.mark.slow
def test_serving_process_health_and_reflection(stack):
    _check(stack.serving_grpc, SERVICES["serving"])
    _check(stack.serving_grpc, "tuneforge.serving.v1.RolloutService")
