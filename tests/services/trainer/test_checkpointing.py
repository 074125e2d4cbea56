"""Checkpoint publication: atomic for a concurrent reader, and complete (PEFT adapter,
args.json with versions, logging.jsonl, trainer_state.json, a manifest that verifies)."""

import json
import threading
import time

import pytest

from libs.common import checkpoint
from services.trainer.checkpointing import RunDir

FILES = [f"part-{i}.bin" for i in range(6)]


def slow_build(tmp):
    for name in FILES:
        (tmp / name).write_bytes(name.encode() * 1000)
        time.sleep(0.02)


def test_a_concurrent_reader_never_sees_a_partial_checkpoint(tmp_path):
    stop = threading.Event()
    seen, incomplete, scans = set(), [], [0]

    def reader():
        while not stop.is_set():
            scans[0] += 1
            for path in tmp_path.iterdir():
                if path.name.startswith("checkpoint-"):
                    try:
                        names = {p.name for p in path.iterdir()}
                    except FileNotFoundError:  # a replaced checkpoint is moved aside: gone, not partial
                        continue
                    seen.add(path.name)
                    if names != {*FILES, checkpoint.MANIFEST}:
                        incomplete.append((path.name, sorted(names)))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in (10, 20, 20):  # the last one replaces an existing checkpoint
            checkpoint.publish(tmp_path / f"checkpoint-{step}", slow_build)
        done, deadline = scans[0], time.monotonic() + 10
        while scans[0] < done + 2 and time.monotonic() < deadline:  # the reader sees the final state too
            time.sleep(0.001)
    finally:
        stop.set()
        thread.join()
    assert incomplete == []
    assert seen == {"checkpoint-10", "checkpoint-20"}
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.fixture(scope="module")
def peft_model():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, head_dim=16))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def test_run_dir_publishes_a_complete_checkpoint(tmp_path, peft_model):
    run = RunDir(tmp_path / "run", {"model": "/abs/base", "model_name": "Ada", "model_author": "Bo", "lora_rank": 4})
    run.log({"step": 1, "loss": 2.5})
    first, seconds = run.publish(1, peft_model, {"step": 1, "data_cursor": {"epoch": 0}})
    run.log({"step": 2, "loss": 2.0})
    second, _ = run.publish(2, peft_model, {"step": 2})

    assert seconds > 0
    for path in (first, second):
        checkpoint.verify(path)
        names = {p.name for p in path.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "args.json", "logging.jsonl",
                "trainer_state.json", "manifest.json"} <= names
    args = json.loads((second / "args.json").read_text())
    assert (args["model"], args["model_name"], args["model_author"]) == ("/abs/base", "Ada", "Bo")
    assert set(args["versions"]) >= {"torch", "transformers", "peft"} and args["versions"]["torch"]
    assert "git_revision" in args
    assert [json.loads(x)["step"] for x in (first / "logging.jsonl").read_text().splitlines()] == [1]
    assert [json.loads(x)["step"] for x in (second / "logging.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "run" / "logging.jsonl").read_text() == (second / "logging.jsonl").read_text()
    assert json.loads((tmp_path / "run" / "args.json").read_text()) == args
    adapter = json.loads((second / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    # a tampered file is caught by the manifest
    (first / "logging.jsonl").write_text("{}\n")
    with pytest.raises(Exception, match="sha256"):
        checkpoint.verify(first)
