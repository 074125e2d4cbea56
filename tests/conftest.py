"""Session fixtures: the embedded default model and one running stack
(dataprep, trainer, serving as real processes on loopback, one vLLM engine for
the whole session)."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import pytest

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
        serving = running.start_serving(model=str(default_model), trainer_address=trainer.grpc_address)
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
