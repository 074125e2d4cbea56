"""The built images run under podman (runc): each answers gRPC health SERVING through the real health
stub and serves a /metrics page that passes promtool; the serving image answers /v1/models.

Needs the archives of `make images` (bazel-bin/services/<service>/image.tar, or $TUNEFORGE_IMAGES/<service>.tar),
podman and runc; skips with the reason otherwise. Slow: loading the three archives and starting the
serving container's vLLM engine took 220 s on the 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
# crun fails on these machines (rlimits, cgroups); runc with explicit ulimits runs (docs/operations.md).
PODMAN = ["podman", "--runtime", "runc"]
RUN_FLAGS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def _archive(service: str) -> pathlib.Path:
    images = os.environ.get("TUNEFORGE_IMAGES")
    if images:
        return pathlib.Path(images) / f"{service}.tar"
    return ROOT / "bazel-bin" / "services" / service / "image.tar"


def _podman_reason() -> str | None:
    for tool in ("podman", "runc", "promtool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc prometheus)"
    info = subprocess.run(PODMAN + ["info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-300:]}"
    missing = [str(_archive(s)) for s in ("dataprep", "trainer", "serving") if not _archive(s).is_file()]
    if missing:
        return f"no image archives ({', '.join(missing)}): run `make images` first"
    return None


@pytest.fixture(scope="module")
def podman():
    reason = _podman_reason()
    if reason:
        pytest.skip(reason)
    names: list[str] = []

    def run(service: str, ports: list[int], *args: str, env: dict | None = None,
            volumes: tuple[str, ...] = ()) -> dict[int, int]:
        loaded = subprocess.run(PODMAN + ["load", "-q", "-i", str(_archive(service))],
                                capture_output=True, text=True, timeout=600)
        assert loaded.returncode == 0, loaded.stderr
        image = loaded.stdout.strip().split("Loaded image: ")[-1].split(",")[0]
        name = _name(service)
        command = PODMAN + ["run", "-d", "--name", name, *RUN_FLAGS, "--shm-size", "1g"]
        command += [f"-p127.0.0.1::{port}" for port in ports]
        command += [f"-e{key}={value}" for key, value in (env or {}).items()]
        command += [f"-v{volume}" for volume in volumes]
        started = subprocess.run(command + [image, *args], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        names.append(name)
        mapped = {}
        for port in ports:
            found = subprocess.run(PODMAN + ["port", name, f"{port}/tcp"], capture_output=True, text=True, timeout=30)
            mapped[port] = int(found.stdout.strip().rsplit(":", 1)[1])
        return mapped

    yield run
    for name in names:
        subprocess.run(PODMAN + ["rm", "-f", "-t", "5", name], capture_output=True, timeout=120)


def _name(service: str) -> str:
    return f"tuneforge-test-{service}-{os.getpid()}"


def _logs(service: str) -> str:
    found = subprocess.run(PODMAN + ["logs", "--tail", "30", _name(service)],
                           capture_output=True, text=True, timeout=30)
    return found.stdout + found.stderr


def _wait_serving(service: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            running = subprocess.run(PODMAN + ["inspect", "-f", "{{.State.Running}}", _name(service)],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
            assert running == "true", f"{service} exited while starting; logs:\n{_logs(service)}"
            assert time.monotonic() < deadline, f"{service} not SERVING in {timeout:.0f} s; logs:\n{_logs(service)}"
            time.sleep(0.5)


def _promtool(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    return text


@pytest.mark.parametrize("service,grpc_port,metrics_port", [("dataprep", 50051, 9401), ("trainer", 50052, 9402)])
def test_grpc_service_image_runs_as_non_root_answers_health_and_serves_lint_clean_metrics(
        podman, service, grpc_port, metrics_port):
    ports = podman(service, [grpc_port, metrics_port])
    _wait_serving(service, ports[grpc_port], timeout=120)
    text = _promtool(f"http://127.0.0.1:{ports[metrics_port]}/metrics")
    assert "process_cpu_seconds_total" in text
    user = subprocess.run(PODMAN + ["exec", _name(service), "id", "-u"],
                          capture_output=True, text=True, timeout=30)
    assert user.stdout.strip() == "10001"
    # The image's own health command, as compose runs it.
    health = subprocess.run(PODMAN + ["exec", _name(service), "tuneforge", "health",
                                      f"127.0.0.1:{grpc_port}"], capture_output=True, text=True, timeout=60)
    assert (health.returncode, health.stdout.strip()) == (0, f"127.0.0.1:{grpc_port}: SERVING")


def test_serving_image_answers_health_models_and_metrics(podman, default_model):
    ports = podman("serving", [8000, 50053], "--model", "/models/base", "--served_model_name", "base",
                   env={"VLLM_CPU_KVCACHE_SPACE": "1"}, volumes=(f"{default_model}:/models/base:ro",))
    _wait_serving("serving", ports[50053], timeout=420)
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[8000]}/v1/models", timeout=10) as reply:
        models = json.load(reply)
    assert [model["id"] for model in models["data"]] == ["base"]
    assert "tuneforge_serving_" in _promtool(f"http://127.0.0.1:{ports[8000]}/metrics")
