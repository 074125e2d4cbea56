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


@pytest.mark.parametrize("name", ["dataprep", "trainer"])
def test_process_serves_mutual_tls_from_its_flags(name, tmp_path, tls_files, monkeypatch):
    """--tls_cert/--tls_key/--tls_client_ca on the process; the client side through the
    TUNEFORGE_TLS_* environment (what --tls_ca and friends set): health and reflection over
    mutual TLS; a plaintext client and one without a certificate are refused."""
    from libs.common import channels

    monkeypatch.setenv(channels.ENV_CA, tls_files.ca)
    monkeypatch.setenv(channels.ENV_CERT, tls_files.client_cert)
    monkeypatch.setenv(channels.ENV_KEY, tls_files.client_key)
    with Stack(tmp_path) as stack:  # waits for SERVING through the TLS channel factory
        process = stack.start(name, ["--tls_cert", tls_files.server_cert, "--tls_key", tls_files.server_key,
                                     "--tls_client_ca", tls_files.ca])
        with channels.open_channel(process.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICES[name]), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert SERVICES[name] in set(ProtoReflectionDescriptorDatabase(channel).get_services())
        monkeypatch.delenv(channels.ENV_CERT)
        monkeypatch.delenv(channels.ENV_KEY)
        for open_channel in (channels.open_channel, grpc.insecure_channel):
            with open_channel(process.grpc_address) as channel, pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert '"tls": "mutual"' in process.log_path.read_text()


def test_process_names_an_unusable_certificate_flag(tmp_path, tls_files):
    with Stack(tmp_path) as stack, pytest.raises(Exception) as info:
        stack.start("trainer", ["--tls_cert", str(tmp_path / "missing.pem"), "--tls_key", tls_files.server_key])
    assert f"tls_cert: cannot read {tmp_path / 'missing.pem'}: No such file or directory" in str(info.value)
    assert "Traceback" not in str(info.value)
