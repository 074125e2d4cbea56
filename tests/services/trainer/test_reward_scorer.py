"""A reward model as a reward (`--reward_model`): checkpoints of the rm method (built by its
build_model and published by the run directory's own publication, full and LoRA) load, and
score each prompt + completion in batches of uneven lengths exactly as the model scores the
sequence alone; paths that hold no reward model are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from libs.common.errors import InvalidArgument, NotFound
from services.trainer import rewards
from services.trainer.checkpointing import RunDir
from services.trainer.config import TrainConfig
from services.trainer.methods import rm
from services.trainer.rewards.model import RewardModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
COMPLETIONS = [[12, 13], [14, 15, 16, 17], [18], [19, 20, 21, 22, 23, 24]]


def published(tmp_path, default_model, train_type: str):
    """(the in-memory reward model, its run directory) after the run directory published it
    as checkpoint-2, as a `tuneforge rlhf --rlhf_type rm` run does."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = rm.build_reward_model(TrainConfig(rlhf_type="rm", train_type=train_type), default_model)
    with torch.no_grad():  # rewards of order 1, and a LoRA that changes them
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "score" in name or "lora_B" in name:
                parameter.normal_(0.0, 0.05, generator=generator)
    run = RunDir(tmp_path / "run", {"model": str(default_model), "rlhf_type": "rm", "train_type": train_type})
    full = train_type == "full"
    run.publish(2, model, {"step": 2}, tokenizer=AutoTokenizer.from_pretrained(default_model) if full else None)
    return model.eval(), tmp_path / "run"


def alone(model, prompt, completion) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt + completion])).logits[0, 0].item()


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_a_published_reward_model_scores_each_sequence_as_alone(tmp_path, default_model, train_type):
    model, run = published(tmp_path, default_model, train_type)
    scorer = RewardModel(run, "cpu", batch_size=3)  # the run directory: its newest checkpoint
    assert scorer.path == (run / "checkpoint-2").resolve() and scorer.pad_id == model.config.pad_token_id
    got = scorer.score(PROMPTS, COMPLETIONS)
    expected = torch.tensor([alone(model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.01  # the scores differ, so a mixed-up order would show
    assert not any(p.requires_grad for p in scorer.model.parameters())
    # as a reward function beside the others: weighted, and fed prompt_ids
    total, per_func = rewards.score([scorer.reward_func(), *rewards.resolve(["repetition"])], [2.0, 1.0],
                                    ["p"] * 4, ["a"] * 4, COMPLETIONS, {}, [f"k{i}" for i in range(4)],
                                    prompt_ids=PROMPTS)
    torch.testing.assert_close(per_func["reward_model"], got)
    torch.testing.assert_close(total, 2 * got)


def test_paths_that_hold_no_reward_model_are_refused(tmp_path, default_model):
    with pytest.raises(NotFound) as missing:
        RewardModel(tmp_path / "nothing")
    assert str(missing.value) == f"reward_model: {tmp_path / 'nothing'} does not exist"
    with pytest.raises(InvalidArgument) as causal:
        RewardModel(default_model)
    assert str(causal.value) == (f"reward_model: {default_model.resolve()} is a LlamaForCausalLM, not a reward model "
                                 "(a sequence-classification model from `tuneforge rlhf --rlhf_type rm`)")
    (tmp_path / "empty").mkdir()
    sft = tmp_path / "sft" / "checkpoint-5"
    sft.mkdir(parents=True)
    (sft / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "peft_type": "LORA"}))
    assert rewards.problems([], None, [], [str(tmp_path / "empty"), str(tmp_path / "sft")]) == [
        f"reward_model: {tmp_path / 'empty'} holds no reward model (no adapter_config.json or config.json, nor a "
        "checkpoint-N with one): give a checkpoint of `tuneforge rlhf --rlhf_type rm`",
        f"reward_model: {sft.resolve()} is a LoRA adapter of task CAUSAL_LM, not a reward model (SEQ_CLS, from "
        "`tuneforge rlhf --rlhf_type rm`)"]


@pytest.mark.gpu
def test_on_cuda_it_scores_as_on_cpu(tmp_path, default_model):
    """float32 on both; the GPU's matmuls accumulate in another order, hence 1e-4."""
    if not torch.cuda.is_available():
        print("SKIPPED: needs a CUDA device (none here)")
        pytest.skip("needs a CUDA device (none here)")
    _, run = published(tmp_path, default_model, "full")
    on_gpu = RewardModel(run, "cuda", batch_size=3)
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    got = on_gpu.score(PROMPTS, COMPLETIONS)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, RewardModel(run, "cpu").score(PROMPTS, COMPLETIONS), rtol=0, atol=1e-4)
