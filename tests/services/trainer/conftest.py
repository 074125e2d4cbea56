"""Real services for the trainer's tests: a dataprep gRPC server with a small prepared
self-cognition dataset, and a trainer gRPC server, both on 127.0.0.1 port 0."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import pytest

from libs.common.server import create_server
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.dataprep.servicer import DataprepServicer, register as register_dataprep
from services.trainer.jobs import JobManager
from services.trainer.servicer import register as register_trainer

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
