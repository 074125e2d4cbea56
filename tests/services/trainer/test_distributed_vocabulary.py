"""LoRA with modules_to_save embed_tokens,lm_head on a vocabulary extended by --tokenizer, under
DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (the Chinese-LLaMA recipe's setting): the
checkpoint holds the whole resized modules, and a resume from a mid-run checkpoint logs the
uninterrupted run's losses (the same bound as tests/services/trainer/test_distributed.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from libs.default_model.resolve import resolve_model
from services.trainer.config import TrainConfig
from tests.services.trainer.launching import finish, run_worker

STEPS = 5


@pytest.fixture(scope="module")
def extended_tokenizer(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    base = len(tokenizer)
    tokenizer.add_tokens(["zorblaxian", "quuxotic"])
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return str(out), base


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "logging.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_modules_to_save_on_a_resized_vocabulary_train_and_resume_exactly_under_zero(
        stage, extended_tokenizer, prepared_dataset, dataprep_address, tmp_path):
    tokenizer, base = extended_tokenizer

    def job(output_dir, **extra):
        return TrainConfig(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(output_dir),
                           tokenizer=tokenizer, modules_to_save=["embed_tokens", "lm_head"], deepspeed=stage,
                           nproc_per_node=2, max_steps=STEPS, save_steps=3, per_device_train_batch_size=1,
                           gradient_accumulation_steps=2, lora_dropout=0.1, learning_rate=5e-4, seed=7, **extra)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, _events, err = finish(run_worker(job(whole), tmp_path))
    assert code == 0, err[-3000:]
    saved = load_file(whole / "checkpoint-3" / "adapter_model.safetensors")
    rows = {k: t.shape[0] for k, t in saved.items() if "embed_tokens" in k or "lm_head" in k}
    assert rows and set(rows.values()) == {base + 2}, rows  # the resized modules, whole
    assert len(AutoTokenizer.from_pretrained(whole / "checkpoint-3")) == base + 2
    code, _events, err = finish(run_worker(job(resumed, resume_from_checkpoint=str(whole / "checkpoint-3")), tmp_path))
    assert code == 0, err[-3000:]
    expected, got = losses(whole), losses(resumed)
    assert len(got) == STEPS
    worst = max(abs(a - b) for a, b in zip(got[3:], expected[3:]))
    print(f"{stage} modules_to_save resumed: max |loss - uninterrupted| over steps 4-{STEPS} = {worst:.2e}")
    assert worst <= 1e-6
    final = load_file(resumed / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    reference = load_file(whole / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert max(float((final[k] - reference[k]).abs().max()) for k in final) <= 1e-6
    assert any(not torch.equal(saved[k], reference[k]) for k in rows)  # the whole modules trained on
