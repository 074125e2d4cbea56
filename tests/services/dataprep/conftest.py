"""Fixtures of the dataprep tests: the default model's tokenizer, tokenizers with
Qwen2.5's and Llama-3's real chat templates, dataset files and one real dataprep
gRPC server on 127.0.0.1 for the session."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

TESTDATA = pathlib.Path(__file__).parent / "testdata"


@pytest.fixture(scope="session")
def tokenizer(default_model):
    from services.dataprep.template import load_tokenizer

    return load_tokenizer(default_model)


def model_dir(tmp_path_factory, default_model, name: str, jinja: str, special=(), added=(), bos=None, eos=None):
    """A tokenizer-only model directory: the default model's tokenizer, `jinja` as its
    chat template, the template's special tokens added; loadable as --model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    if added:
        tokenizer.add_tokens(list(added))
    if bos:
        tokenizer.bos_token = bos
    if eos:
        tokenizer.eos_token = eos
    tokenizer.chat_template = (TESTDATA / jinja).read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp(name)
    tokenizer.save_pretrained(path)
    shutil.copy(default_model / "config.json", path / "config.json")
    return path


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory, default_model):
    return model_dir(tmp_path_factory, default_model, "qwen2_5", "qwen2_5.jinja", added=["<tool_call>", "</tool_call>"],
                     eos="<|im_end|>")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, default_model):
    return model_dir(tmp_path_factory, default_model, "llama3", "llama3.jinja",
                     special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     bos="<|begin_of_text|>", eos="<|eot_id|>")


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    from services.dataprep import template

    return template.load_tokenizer(qwen_dir)


@pytest.fixture(scope="session")
def llama(llama_dir):
    from services.dataprep import template

    return template.load_tokenizer(llama_dir)


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
