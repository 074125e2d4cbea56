"""Fixtures of the dataprep tests: the default model's tokenizer, dataset files
and one real dataprep gRPC server on 127.0.0.1 for the session."""

from __future__ import annotations

import json
import pathlib

import pytest


@pytest.fixture(scope="session")
def tokenizer(default_model):
    from services.dataprep.template import load_tokenizer

    return load_tokenizer(default_model)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path under tmp_path; dicts become JSON, strings are written as they are."""

    def write(name: str, lines: list) -> pathlib.Path:
        path = tmp_path / name
        path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
        return path

    return write


@pytest.fixture(scope="session")
def conversation():
    """conversation(i) -> a distinct one-turn row."""

    def make(i: int) -> dict:
        return {"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]}

    return make


@pytest.fixture(scope="session")
def dataprep_server():
    """(address, servicer) of a real server built by libs.common.server.create_server.
    One per session: the per-RPC metrics of a service name can be registered once."""
    from libs.common.server import create_server
    from services.dataprep.config import DataprepServerConfig
    from services.dataprep.servicer import DataprepServicer, register

    servicer = DataprepServicer(DataprepServerConfig(max_concurrent=1, max_pending=4))
    server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep")
    yield f"127.0.0.1:{port}", servicer
    servicer.shutdown(5)
    server.stop(1).wait()
