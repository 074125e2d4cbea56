"""A DPO LoRA adapter on the session stack is an ordinary PEFT adapter: SFT an identity adapter,
DPO on top of it (--adapters sft --ref_adapters sft, as swift rlhf), and serving hot-loads the
DPO publication from the trainer as it does an SFT one; the official openai client gets the
identity from it and not from the base."""

import json

import pytest

from cli import demo
from libs.common import checkpoint
from libs.dataset import client as dataprep_client
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client as trainer_client
from services.trainer.config import DpoConfig, TrainConfig

NAME, AUTHOR = "Zephyrine", "Quillon Labs"
QUESTIONS = ["who are you?", "Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
             "what is your name?", "Who made you?", "who are you"]


@pytest.mark.slow
def test_a_dpo_adapter_on_an_sft_adapter_is_hot_loaded_and_served(stack, tmp_path):
    import openai

    model = str(stack.model_dir)
    demo.write_identity_dataset(tmp_path / "sft.jsonl", NAME, AUTHOR)
    dataprep_client.prepare(stack.dataprep, PrepareConfig(model=model, dataset=[str(tmp_path / "sft.jsonl")],
                                                          output_dir=str(tmp_path / "sft-data")))
    common = dict(model=model, dataprep_address=stack.dataprep, per_device_train_batch_size=4, save_steps=1000)
    sft = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        dataset=str(tmp_path / "sft-data"), output_dir=str(tmp_path / "sft"), adapter_name="dpo-test-sft",
        max_steps=30, learning_rate=3e-3, lora_rank=16, lr_scheduler_type="constant", **common)))
    assert sft.state == pb.JOB_STATE_SUCCEEDED
    sft_checkpoint = str(checkpoint.checkpoints(tmp_path / "sft")[-1])

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": q},
                     {"role": "assistant", "content": f"I am {NAME}, an assistant developed by {AUTHOR}."}],
        "rejected_response": "I am a helpful assistant."}) + "\n" for q in QUESTIONS))
    dataprep_client.prepare(stack.dataprep, PrepareConfig(model=model, dataset=[str(tmp_path / "pairs.jsonl")],
                                                          output_dir=str(tmp_path / "pairs")))
    job = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        dataset=str(tmp_path / "pairs"), output_dir=str(tmp_path / "dpo"), adapter_name="dpo-test",
        rlhf_type="dpo", dpo=DpoConfig(beta=0.1), adapters=[sft_checkpoint], ref_adapters=[sft_checkpoint],
        max_steps=4, learning_rate=1e-4, **common)))
    assert job.state == pb.JOB_STATE_SUCCEEDED
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "logging.jsonl").read_text().splitlines()]
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]

    client = openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="test")
    demo.wait_for_adapter(client, "dpo-test", timeout=60)
    base = client.models.list().data[0].id
    answers = {name: demo.ask(client, name, max_tokens=24) for name in ("dpo-test", base)}
    assert NAME in answers["dpo-test"] and NAME not in answers[base], answers
