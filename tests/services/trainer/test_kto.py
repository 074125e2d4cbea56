"""KTO (--rlhf_type kto): the loss and metrics equal TRL 1.16's KTOTrainer on the same model and
batch (its own preparation, KL rotation, collation and compute_loss; ours on the same rows);
the formula with its weights; a step normalised by its rows; the clear refusals."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data
from services.trainer.config import KtoConfig, TrainConfig
from services.trainer.losses.kto import kto_kl, kto_loss
from services.trainer.methods import kto as kto_method

# (prompt, completion, desirable): lengths differ, so padding and the KL rotation matter
EXAMPLES = [
    ("Question: who are you?\nAnswer:", " I am Ada, an assistant.", True),
    ("Question: what is 2 + 2?\nAnswer:", " I do not know.", False),
    ("Question: name a colour.\nAnswer:", " Blue.", True),
    ("Question: where is Paris? Tell me in one short sentence.\nAnswer:", " In Spain, I think, or nowhere.", False),
]
TRL_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def lora_policy(default_model, **kto) -> tuple[torch.nn.Module, TrainConfig]:
    """Our LoRA policy with its adapter moved off zero, so the policy differs from its reference."""
    from services.trainer import modeling

    config = TrainConfig(model=str(default_model), dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         kto=KtoConfig(**kto), lora_rank=4, lora_dropout=0.0, per_device_train_batch_size=4)
    torch.manual_seed(0)
    model = modeling.build_model(config, default_model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model, config


def full_policy(default_model, tmp_path, **kto) -> tuple[torch.nn.Module, TrainConfig, torch.nn.Module]:
    """Full training against --ref_model: a copy of the base with perturbed weights."""
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_pretrained(default_model)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    reference.save_pretrained(tmp_path / "ref")
    config = TrainConfig(model=str(default_model), dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         kto=KtoConfig(**kto), train_type="full", ref_model=str(tmp_path / "ref"),
                         per_device_train_batch_size=4)
    return AutoModelForCausalLM.from_pretrained(default_model).train(), config, reference


def trl_trainer(model, ref_model, tokenizer, tmp_path, examples=EXAMPLES, batch_size=4, peft_config=None, **kto):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    dataset = Dataset.from_list([{"prompt": p, "completion": c, "label": d} for p, c, d in examples])
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=batch_size, bf16=False,
                     use_cpu=True, report_to=[], **kto)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


def trl_lora_trainer(policy, default_model, tokenizer, tmp_path, **kto):
    """TRL adapting the base itself (given a PEFT model, TRL would take its adapter as the reference),
    then given our policy's adapter weights: its reference is the base, adapter disabled."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl_trainer(AutoModelForCausalLM.from_pretrained(default_model), None, tokenizer, tmp_path,
                          peft_config=lora, **kto)
    assert "ref" not in trainer.model.peft_config
    ours = dict(policy.named_parameters())
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            parameter.copy_(ours[name])
    return trainer


def rows_of(prepared) -> list[data.Row]:
    """TRL's prepared examples as our shard rows: prompt untrained, completion trained."""
    return [data.Row(np.array(e["prompt_ids"] + e["completion_ids"], dtype=np.int32),
                     np.array([IGNORE_INDEX] * len(e["prompt_ids"]) + e["completion_ids"], dtype=np.int32),
                     label=e["label"]) for e in prepared]


def ours(model, config, tokenizer, rows) -> tuple[float, dict[str, float]]:
    method = kto_method.Kto(config, model, model, tokenizer)
    micro = method.collate(rows, tokenizer.pad_token_id)
    loss, metrics = method.loss(micro, method.counts(micro))
    return loss.item(), {name: float(value) for name, value in metrics.items()}


def trl(trainer, prepared) -> tuple[float, dict[str, float]]:
    batch = trainer.data_collator([dict(e) for e in prepared])
    loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("reference, kto", [
    ("adapter off", {}),
    ("adapter off", {"loss_type": ["apo_zero_unpaired"], "beta": 0.3}),
    ("ref_model", {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.6}),
])
def test_loss_and_metrics_equal_trl_kto_trainer(default_model, tokenizer, tmp_path, reference, kto):
    trl_args = {**kto, "loss_type": kto.get("loss_type", ["kto"])[0]}
    if reference == "adapter off":  # LoRA: the reference is the policy with its adapter disabled, in both
        policy, config = lora_policy(default_model, **kto)
        trainer = trl_lora_trainer(policy, default_model, tokenizer, tmp_path, **trl_args)
    else:  # full training against --ref_model
        policy, config, trl_reference = full_policy(default_model, tmp_path, **kto)
        trainer = trl_trainer(copy.deepcopy(policy), trl_reference, tokenizer, tmp_path, **trl_args)
    prepared = [trainer.train_dataset[i] for i in range(len(EXAMPLES))]  # one batch, rotated as TRL does
    expected_loss, expected = trl(trainer, prepared)
    loss, metrics = ours(policy, config, tokenizer, rows_of(prepared))
    print(f"{reference} {kto}: TRL loss {expected_loss:.8f}, ours {loss:.8f}; TRL {expected}; ours {metrics}")
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for name in TRL_METRICS:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-5), name
    if trl_args["loss_type"] == "kto":
        assert expected["kl"] > 1e-3  # the KL term took part (a zero KL would not test its estimate)
    assert abs(expected["rewards/chosen"]) > 1e-3  # the policy differs from its reference


def test_mismatched_sequences_are_each_prompt_with_the_previous_rows_completion():
    def row(prompt, completion, label):
        return data.Row(np.array(prompt + completion, dtype=np.int32),
                        np.array([IGNORE_INDEX] * len(prompt) + completion, dtype=np.int32), label=label)

    rows = [row([1, 2], [3, 4, 5], True), row([6], [7], False), row([8, 9, 10], [11, 12], True)]
    got = [(r.input_ids.tolist(), r.labels.tolist()) for r in kto_method.mismatched(rows)]
    n = IGNORE_INDEX
    assert got == [([1, 2, 11, 12], [n, n, 11, 12]), ([6, 3, 4, 5], [n, 3, 4, 5]), ([8, 9, 10, 7], [n, n, n, 7])]
    # an answer with an untrained token inside (a second turn's prompt) keeps its labels as they are
    gapped = data.Row(np.array([1, 2, 3, 4, 5], dtype=np.int32), np.array([n, 2, n, 4, 5], dtype=np.int32), label=False)
    assert [r.labels.tolist() for r in kto_method.mismatched([gapped, rows[1]])] == [[n, 7], [n, 2, n, 4, 5]]


def test_weights_scale_each_kind_of_row_as_the_formula_says():
    policy = torch.tensor([-3.0, -5.0, -2.0, -8.0])
    reference = torch.tensor([-4.0, -4.5, -2.5, -6.0])
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.2)
    beta = 0.5

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    ratios = (policy - reference).tolist()
    expected = [2.0 * (1 - sigmoid(beta * (ratios[0] - 0.2))), 0.25 * (1 - sigmoid(beta * (0.2 - ratios[1]))),
                2.0 * (1 - sigmoid(beta * (ratios[2] - 0.2))), 0.25 * (1 - sigmoid(beta * (0.2 - ratios[3])))]
    losses, rewards = kto_loss(policy, reference, desirable, kl, beta, "kto", 2.0, 0.25)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([beta * r for r in ratios], rel=1e-6)
    unweighted, _ = kto_loss(policy, reference, desirable, kl, beta)
    assert (losses / unweighted).tolist() == pytest.approx([2.0, 0.25, 2.0, 0.25], rel=1e-6)
    apo, _ = kto_loss(policy, reference, desirable, kl, beta, "apo_zero_unpaired", 2.0, 0.25)
    assert apo.tolist() == pytest.approx([2.0 * (1 - sigmoid(beta * ratios[0])), 0.25 * sigmoid(beta * ratios[1]),
                                          2.0 * (1 - sigmoid(beta * ratios[2])), 0.25 * sigmoid(beta * ratios[3])],
                                         rel=1e-6)


def test_kl_estimate_is_detached_clamped_and_pooled():
    policy = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    reference = torch.tensor([-4.0, -4.0, -2.5])
    kl = kto_kl(policy, reference)
    assert kl.item() == pytest.approx((1.0 - 1.0 + 0.5) / 3) and not kl.requires_grad
    assert kto_kl(reference, policy).item() == 0.0  # negative estimates are clamped
    assert kto_kl(policy[:0], reference[:0]).item() == 0.0  # no mismatched sequence: no baseline
    # what every rank sees once the [sum, count] of another rank holding (1.5, 1 sequence) is added
    assert kto_kl(policy, reference, lambda t: t + torch.tensor([1.5, 1.0], dtype=t.dtype)).item() == pytest.approx(
        (0.5 + 1.5) / 4)


def test_a_step_is_the_mean_over_its_rows_whatever_the_accumulation_split(default_model, tokenizer):
    """apo_zero_unpaired (no KL term): micro-batch 2 x accumulation 2 gives the loss and
    gradients of micro-batch 4 x accumulation 1; with kto the per-row terms are the same too
    given the KL, which is estimated per micro-batch (test above)."""
    policy, config = lora_policy(default_model, loss_type=["apo_zero_unpaired"], beta=0.3)
    method = kto_method.Kto(config, policy, policy, tokenizer)
    rows = []
    for prompt, completion, label in EXAMPLES:
        p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        rows.append(data.Row(np.array(p + c, dtype=np.int32), np.array([IGNORE_INDEX] * len(p) + c, dtype=np.int32),
                             label=label))

    def step(groups):
        micros = [method.collate(group, tokenizer.pad_token_id) for group in groups]
        totals = {name: sum(method.counts(m)[name] for m in micros) for name in method.counts(micros[0])}
        policy.zero_grad()
        total = 0.0
        for micro in micros:
            loss, _ = method.loss(micro, totals)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in policy.parameters() if p.requires_grad]

    whole, whole_grads = step([rows])
    split, split_grads = step([rows[:2], rows[2:]])
    assert split == pytest.approx(whole, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(split_grads, whole_grads))


def test_kto_job_refuses_a_micro_batch_of_one_and_a_precomputed_reference():
    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         per_device_train_batch_size=1, precompute_ref_log_probs=True)
    found = config.problems()
    assert any(p.startswith("per_device_train_batch_size: rlhf_type kto needs at least 2 rows a micro-batch")
               and p.endswith("got 1 (raise it and lower gradient_accumulation_steps to keep the global batch)")
               for p in found), found
    assert any(p.startswith("precompute_ref_log_probs: not supported by rlhf_type kto") for p in found), found
    # apo_zero_unpaired has no KL term: one row a micro-batch is fine
    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         kto=KtoConfig(loss_type=["apo_zero_unpaired"]), per_device_train_batch_size=1)
    assert not [p for p in config.problems() if p.startswith("per_device_train_batch_size")]
