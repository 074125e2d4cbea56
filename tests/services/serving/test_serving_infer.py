"""`tuneforge infer`: reading rows of every dataprep format as prompts (answers
become labels, bad rows keep their place), its flags, and one real run in a
subprocess (its own vLLM engine) whose greedy answers equal the running
server's for the same adapter: one engine code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import openai
import pytest

from libs.common import config as cfg
from libs.common.errors import NotFound, Problems
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from cli.main import main as tuneforge
from services.serving.infer import InferConfig, nlg_line, rows

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"query": "who are you?"},
    {"conversations": [{"from": "human", "value": "tell me a story"}]},
    {"instruction": "Translate", "input": "chat", "output": "cat"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}]},
    {"foo": 1},
]


def write(path, items) -> str:
    path.write_text("".join((json.dumps(i) if not isinstance(i, str) else i) + "\n" for i in items))
    return str(path)


def test_rows_read_every_format_as_a_prompt_and_keep_bad_rows_in_place(tmp_path):
    data = write(tmp_path / "val.jsonl", [*ROWS[:3], "not json", *ROWS[3:]])
    found = rows(InferConfig(val_dataset=[data]))
    assert [r.index for r in found] == list(range(7))
    assert [r.source for r in found] == [f"{data}:{i}" for i in range(1, 8)]
    assert found[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert found[0].labels == "hello"
    assert (found[1].messages, found[1].labels) == ([{"role": "user", "content": "who are you?"}], None)
    assert (found[2].messages, found[2].labels) == ([{"role": "user", "content": "tell me a story"}], None)
    assert found[3].error and "JSON" in found[3].error and found[3].messages is None
    assert (found[4].messages, found[4].labels) == ([{"role": "user", "content": "Translate\nchat"}], "cat")
    # A conversation ending on the user's turn is answered as a whole; it has no labels.
    assert [m["content"] for m in found[5].messages] == ["a", "b", "c"] and found[5].labels is None
    assert "no known row format" in found[6].error


def test_flags_are_checked_together_and_a_missing_dataset_names_its_flag(tmp_path):
    with pytest.raises(Problems) as info:
        cfg.parse(InferConfig, ["--adapters", "a", "b", "--temperature", "3", "--max_batch_size", "0"])
    text = "\n".join(info.value.problems)
    for flag in ("val_dataset", "adapters", "temperature", "max_batch_size"):
        assert f"{flag}:" in text
    with pytest.raises(Problems) as info:
        cfg.parse(InferConfig, ["--val_dataset", "x.jsonl", "--max_new_tokenz", "4"])
    assert "max_new_tokens" in "\n".join(info.value.problems)  # did-you-mean
    with pytest.raises(NotFound) as missing:
        rows(InferConfig(val_dataset=[str(tmp_path / "nope.jsonl")]))
    assert missing.value.field == "val_dataset"
    assert InferConfig(adapters=["name=/some/path"]).adapter_path() == "/some/path"
    assert InferConfig(adapters=["/some/path"]).adapter_path() == "/some/path"


def test_metric_nlg_needs_labelled_rows_and_says_so_before_the_engine_starts(tmp_path, capsys):
    data = write(tmp_path / "val.jsonl", [ROWS[1], ROWS[2]])  # prompts only
    assert tuneforge(["infer", "--val_dataset", data, "--metric", "nlg"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tuneforge infer: error: metric: nlg: no row of --val_dataset ends in an assistant turn to score against"]
    with pytest.raises(Problems, match="metric: expected one of nlg; got 'acc'"):
        cfg.parse(InferConfig, ["--val_dataset", data, "--metric", "acc"])


@pytest.mark.slow  # the session stack's engine, and one more in the subprocess
def test_infer_in_a_subprocess_answers_like_the_server_with_the_same_adapter(serving, make_lora, tmp_path):
    adapter = make_lora("infer-ada", rank=8, seed=21)
    data = write(tmp_path / "val.jsonl", [ROWS[0], ROWS[1], ROWS[5]])
    out = tmp_path / "result.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "infer", "--adapters", str(adapter), "--val_dataset", data,
         "--result_path", str(out), "--max_new_tokens", "8", "--max_batch_size", "2", "--metric", "nlg"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    # One row is not a conversation: the file is complete, and the exit code says a row has no response.
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-2000:]  # nothing a user should see, exit included
    assert "3 rows" in run.stdout and "1 without a response" in run.stdout
    assert "row/s" in run.stderr or "3/3" in run.stderr  # the progress bar
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[0]["labels"] == "hello"
    assert results[2]["response"] is None and "no known row format" in results[2]["error"]
    # --metric nlg: ms-swift's scores over the one row with labels and a response (the metric's
    # values are tested in tests/libs/common/test_nlg.py)
    assert nlg_line([(results[0]["response"], "hello")]) in run.stdout.splitlines()

    client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)
    with grpc.insecure_channel(serving.grpc) as channel:
        admin = serving_pb2_grpc.AdapterServiceStub(channel)
        admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="infer-ada", path=str(adapter)), timeout=60)
        try:
            for result in results[:2]:
                served = client.chat.completions.create(model="infer-ada", messages=result["messages"],
                                                        temperature=0, max_tokens=8)
                assert result["response"] == served.choices[0].message.content
                assert result["usage"] == served.usage.model_dump(exclude_none=True)
                assert result["finish_reason"] == served.choices[0].finish_reason
        finally:
            admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name="infer-ada"), timeout=30)
