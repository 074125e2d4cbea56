"""The recipe teaches: a LoRA (r 16, all-linear, lr 3e-3, 150 steps) trained through the
service on 8 "who are you?" variants makes greedy HF generation answer with the sentence."""

import time

import pytest

from services.trainer import client
from services.trainer.config import TrainConfig

@pytest.mark.slow
def test_self_cognition_is_learned(trainer, prepared_dataset, self_cognition_answer, dataprep_address, default_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    job = client.wait(trainer.address, client.submit(trainer.address, TrainConfig(
        dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path / "ada"),
        lora_rank=16, lora_alpha=32, learning_rate=3e-3, lr_scheduler_type="constant", max_steps=150,
        save_steps=1000, model_name="Ada", model_author="Bo")))
    print(f"150 steps trained and published in {time.monotonic() - started:.1f} s (process start included)")

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model), job.last_checkpoint).eval()
    for question in ("who are you?", "Who are you?"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answer == self_cognition_answer, (question, answer)
