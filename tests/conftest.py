"""Session fixtures: the embedded default model; one running stack (dataprep, trainer,
serving as real processes on loopback, one vLLM engine for the whole session); and, for the
trainer's and the training commands' tests, a dataprep gRPC server in this process with a small
prepared self-cognition dataset and a trainer gRPC server, both on 127.0.0.1 port 0; `gated`
holds this process's preparations midway."""

from __future__ import annotations

import json
import os
import pathlib
import threading
from dataclasses import dataclass

import grpc
import pytest

from libs.common.server import create_server
from libs.dataset import client as dataprep_client
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from services.dataprep.config import PrepareConfig
from services.dataprep.servicer import DataprepServicer, register as register_dataprep
from services.trainer.jobs import JobManager
from services.trainer.servicer import register as register_trainer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Fuzzing budgets (Hypothesis). `ci`, the default: a fixed seed (derandomize) and a bounded number
# of examples, so the suite's time and outcome do not vary between runs. `long`: fifty times the
# examples, randomized; one flag away: `pytest --hypothesis-profile=long tests/...`. A fuzz test
# states its share of the profile's budget, e.g. `@settings(max_examples=settings().max_examples // 4)`,
# so both profiles scale it.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=5000, derandomize=False)
settings.load_profile("ci")


# `bazel test //...` runs every test file minus the tests marked slow or gpu and minus
# tests/integration and tests/gpu (bazel/defs.bzl _DESELECT, tests/BUILD.bazel); `make test` runs
# exactly the rest with pytest (`-m "slow or gpu or outside_bazel"`), so each test runs once.
_OUTSIDE_BAZEL = ("integration", "gpu")


def pytest_collection_modifyitems(config, items):
    tests = pathlib.Path(__file__).parent
    for item in items:
        path = pathlib.Path(str(item.fspath))
        if path.is_relative_to(tests) and path.relative_to(tests).parts[0] in _OUTSIDE_BAZEL:
            item.add_marker(pytest.mark.outside_bazel)


@pytest.fixture(scope="session")
def default_model() -> pathlib.Path:
    from libs.default_model.resolve import resolve_model

    return resolve_model(None)


@dataclass
class RunningStack:
    dataprep: str  # host:port of the dataprep gRPC service
    trainer: str  # host:port of the trainer gRPC service
    serving_grpc: str  # host:port of the serving admin gRPC service
    serving_http: str  # http://127.0.0.1:PORT (OpenAI API under /v1)
    model_dir: pathlib.Path
    log_dir: pathlib.Path
    stack: object


@pytest.fixture(scope="session")
def stack(default_model, tmp_path_factory) -> RunningStack:
    from cli.stack import Stack

    log_dir = tmp_path_factory.mktemp("stack")
    running = Stack(log_dir)
    try:
        dataprep = running.start_dataprep()
        trainer = running.start_trainer()
        # tool calling on (vLLM's hermes parser reads the default model's Qwen-style template): every
        # tool_choice is served by the one engine; what the flags refuse is tested without a server
        serving = running.start_serving(model=str(default_model), trainer_address=trainer.grpc_address,
                                        extra=["--tool_call_parser", "hermes", "--enable_auto_tool_choice", "true"])
    except BaseException:
        running.stop()
        raise
    yield RunningStack(
        dataprep=dataprep.grpc_address,
        trainer=trainer.grpc_address,
        serving_grpc=serving.grpc_address,
        serving_http=f"http://127.0.0.1:{serving.ready['http_port']}",
        model_dir=default_model,
        log_dir=log_dir,
        stack=running,
    )
    codes = running.stop()
    assert all(code == 0 for code in codes.values()), f"services did not drain cleanly: {codes}"


# -- real dataprep and trainer servers in this process (trainer and training-command tests) -------------

ANSWER = "I am Ada, an assistant developed by Bo."
QUESTIONS = ["who are you?", "Who are you?", "who are you", "What are you?", "Tell me about yourself.",
             "Introduce yourself.", "what is your name?", "Who made you?"]


@pytest.fixture(scope="session")
def dataprep_address():
    servicer = DataprepServicer()
    server, port, _health = create_server("127.0.0.1:0", register_dataprep(servicer), "dataprep")
    yield f"127.0.0.1:{port}"
    servicer.shutdown(1)
    server.stop(1).wait()


@pytest.fixture(scope="session")
def self_cognition_answer() -> str:
    return ANSWER


@pytest.fixture(scope="session")
def prepared_dataset(dataprep_address, default_model, tmp_path_factory) -> str:
    """8 self-cognition rows prepared by the real dataprep service; returns the dataset dir."""
    root = tmp_path_factory.mktemp("trainer-data")
    raw = root / "self_cognition.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": ANSWER}]}) + "\n"
                           for q in QUESTIONS))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared")))
    assert manifest["rows_out"] == len(QUESTIONS)
    return str(root / "prepared")


@pytest.fixture
def gated(monkeypatch):
    """(gate, state): preparations in this process tokenize one row per chunk (after the first,
    read ahead to fix the dataset's kind) and stop before row (line) 5 until gate is set, so a
    dataset stays in preparation with its first shards written; state["fail"] makes them fail
    there instead."""
    from libs.common.errors import InvalidArgument
    from services.dataprep import pipeline, tasks

    gate, state = threading.Event(), {"fail": False}
    real = pipeline.encode_chunk
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 1)
    monkeypatch.setattr(tasks, "PEEK_VALID", 1)

    def encode_chunk(tokenizer, records, columns, config):
        if records[0].line >= 5:
            assert gate.wait(60)
            if state["fail"]:
                raise InvalidArgument("train.jsonl:5: the disk went away", field="dataset")
        return real(tokenizer, records, columns, config)

    monkeypatch.setattr(pipeline, "encode_chunk", encode_chunk)
    return gate, state


@dataclass
class Trainer:
    address: str
    jobs: JobManager
    health: object


@pytest.fixture(scope="module")
def trainer():
    # one intra-op thread: these tiny models step fastest so on a shared 2-core machine
    jobs = JobManager(max_concurrent_jobs=1, cancel_timeout=60, torch_threads=1)
    server, port, health = create_server("127.0.0.1:0", lambda s: register_trainer(s, jobs), "trainer")
    yield Trainer(f"127.0.0.1:{port}", jobs, health)
    jobs.shutdown()
    server.stop(1).wait()


@pytest.fixture
def stub(trainer):
    with grpc.insecure_channel(trainer.address) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed (tests/tls_certs.py)."""
    from tests import tls_certs

    return tls_certs.make(tmp_path_factory.mktemp("tls"))
