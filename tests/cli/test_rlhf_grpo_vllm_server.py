"""`tuneforge rlhf --rlhf_type grpo --use_vllm true --vllm_mode server` end to end against the
session's serving process (no engine of its own): each rollout's LoRA policy is pushed to serving
under the job's rollout adapter name and generated there, the sync and generation seconds are
logged for every step, and the adapter leaves serving when the job ends."""

import json

import grpc
import pytest

from cli.main import main as tuneforge
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.slow

SHORT = '''def short(completions, completion_ids, **kwargs):
    return [-float(len(ids)) for ids in completion_ids]
'''
STEPS = 4


def test_grpo_generates_on_the_serving_service(stack, tmp_path, capsys):
    raw, plugin, run = tmp_path / "prompts.jsonl", tmp_path / "short.py", tmp_path / "run"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                           for q in ("who are you?", "What is your name?", "Tell me a story.", "Who made you?")))
    plugin.write_text(SHORT)
    host, port = stack.serving_grpc.rsplit(":", 1)
    code = tuneforge(["rlhf", "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", str(run),
                      "--external_plugins", str(plugin), "--reward_funcs", "short", "--adapter_name", "grpo-srv",
                      "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "12",
                      "--max_steps", str(STEPS), "--learning_rate", "3e-3", "--beta", "0", "--lora_rank", "8",
                      "--log_completions", "true", "--use_vllm", "true", "--vllm_mode", "server",
                      "--vllm_server_host", host, "--vllm_server_port", port])
    _out, err = capsys.readouterr()
    assert code == 0, err
    logged = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == list(range(1, STEPS + 1))
    assert all(e["sync_seconds"] > 0 and e["generation_seconds"] > 0 for e in logged)
    print("server mode, per step: sync", [round(e["sync_seconds"], 3) for e in logged],
          "generation", [round(e["generation_seconds"], 3) for e in logged])
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == STEPS * 8
    assert all(c["reward"] == c["short"] for c in completions)
    with grpc.insecure_channel(stack.serving_grpc) as channel:
        served = serving_pb2_grpc.AdapterServiceStub(channel).ListAdapters(serving_pb2.ListAdaptersRequest(),
                                                                          timeout=10).adapters
    assert not any(a.name.startswith("grpo-srv") for a in served)  # the rollout adapter left with the job
    log = next(stack.log_dir.rglob("serving*.log")).read_text()
    assert log.count('"adapter": "grpo-srv-rollout"') >= STEPS  # pushed for every rollout, then unloaded
