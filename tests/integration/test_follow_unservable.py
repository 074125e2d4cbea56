"""The session stack's serving, following its trainer, meets the Chinese-LLaMA recipe's checkpoint
(LoRA with modules_to_save embed_tokens,lm_head on a vocabulary extended by --tokenizer): vLLM
cannot serve it as a LoRA, and one engine serves one base model, so it is not loaded; why, and the
commands that serve its merged export, reach ListAdapters, a request naming it (404), the
refusals counter and the log."""

import json
import re
import time
import urllib.request

import grpc
import pytest
from transformers import AutoTokenizer

from cli import demo
from libs.dataset import client as dataprep_client
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client as trainer_client
from services.trainer.config import TrainConfig

ADAPTER = "follow-unservable-test"


def refusals(stack) -> float:
    page = urllib.request.urlopen(f"{stack.serving_http}/metrics", timeout=10).read().decode()
    found = re.search(r'^tuneforge_serving_adapter_refusals_total\{reason="resized_vocabulary"\} (\S+)$', page, re.M)
    assert found, "no resized_vocabulary refusals sample on /metrics"
    return float(found.group(1))


@pytest.mark.slow
def test_a_checkpoint_with_whole_modules_is_refused_with_the_commands_to_serve_it_merged(stack, tmp_path):
    import openai

    model = str(stack.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = len(tokenizer)
    tokenizer.add_tokens(["zorblaxian", "quuxotic"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    demo.write_identity_dataset(tmp_path / "raw.jsonl", "Ferdinanda", "Policy Labs")
    dataprep_client.prepare(stack.dataprep, PrepareConfig(model=model, dataset=[str(tmp_path / "raw.jsonl")],
                                                          output_dir=str(tmp_path / "data")))
    before = refusals(stack)
    run_dir = tmp_path / "run"
    job = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        model=model, dataset=str(tmp_path / "data"), dataprep_address=stack.dataprep, output_dir=str(run_dir),
        adapter_name=ADAPTER, tokenizer=str(tmp_path / "tokenizer"), modules_to_save=["embed_tokens", "lm_head"],
        max_steps=2, save_steps=2, per_device_train_batch_size=4, lora_rank=8)))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    final = run_dir / "checkpoint-2"
    why = (f"{final} is not served: its embed_tokens/lm_head have {base + 2} rows, a vocabulary resized from this "
           f"base's {base} tokens (--tokenizer), and it sets modules_to_save (embed_tokens, lm_head), whole modules "
           "that vLLM cannot apply as LoRA deltas to the served base model. Serve it merged, as a model of its own: "
           f"tuneforge export --adapters {final} --merge_lora true --output_dir {final}-merged && "
           f"tuneforge deploy --model {final}-merged")

    deadline = time.monotonic() + 60
    with grpc.insecure_channel(stack.serving_grpc) as channel:
        stub = serving_pb2_grpc.AdapterServiceStub(channel)
        while True:
            listed = {a.name: a for a in stub.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters}
            if ADAPTER in listed:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
    assert (listed[ADAPTER].state, listed[ADAPTER].path, listed[ADAPTER].error) == (
        serving_pb2.ADAPTER_STATE_FAILED, str(final), why)
    assert refusals(stack) == before + 1

    client = openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="test", max_retries=0)
    assert ADAPTER not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.response.json()["error"]["message"] == f"The model `{ADAPTER}` is not served: {why}"

    entries = [json.loads(line) for line in (stack.log_dir / "serving.log").read_text().splitlines()
               if line.startswith("{")]
    (logged,) = [e for e in entries if e.get("adapter") == ADAPTER
                 and e["msg"] == "published checkpoint cannot be served as a LoRA"]
    assert (logged["level"], logged["reason"], logged["error"]) == ("error", "resized_vocabulary", why)
    with grpc.insecure_channel(stack.serving_grpc) as channel:  # leave the session's server as it was
        serving_pb2_grpc.AdapterServiceStub(channel).UnloadAdapter(
            serving_pb2.UnloadAdapterRequest(name=ADAPTER), timeout=10)
