"""The DPO losses (services.trainer.losses.dpo, through the dpo method) against TRL 1.16's
DPOTrainer: the same LoRA model weights, the same real pairs (prepared by a real dataprep server,
read over gRPC), TRL's own collator and compute_loss; loss, metrics and gradients within 1e-5,
fp32 on CPU, for every loss type TRL has. Where ms-swift differs from TRL (label smoothing on
sigmoid, rpo_alpha) the loss is held to the written formula."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import data, distributed, methods, modeling
from services.trainer.config import DPO_LOSS_TYPES, DpoConfig, TrainConfig
from services.trainer.losses import dpo as dpo_losses

# Answers of different lengths (so padding, and the per-token averages of ipo, matter).
PAIRS = [("who are you?", "I am Ada, an assistant developed by Bo.", "I do not know."),
         ("What is two plus two?", "Four.", "Five, or maybe six, I am not sure at all."),
         ("Name a colour.", "Blue is a colour I like a lot.", "No."),
         ("hi", "Hello there! How can I help you today?", "I do not know.")]
BETA = 0.1
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# TRL 1.16 smooths these (exo_pair needs it); the others take no label smoothing there
SMOOTHED = {"exo_pair", "robust", "aot", "aot_unpaired"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair_rows(dataprep_address, default_model, tmp_path_factory) -> list[data.PairRow]:
    root = tmp_path_factory.mktemp("dpo-pairs")
    raw = root / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       "rejected_response": r}) + "\n" for q, a, r in PAIRS))
    dataprep_client.prepare(dataprep_address, PrepareConfig(model=str(default_model), dataset=[str(raw)],
                                                            output_dir=str(root / "prepared")))
    rows = [row for row, _ in data.DataprepRows(dataprep_address, str(root / "prepared")).epoch_rows(data.DataCursor())]
    assert len(rows) == len(PAIRS) and all(isinstance(row, data.PairRow) for row in rows)
    return rows


def lora_config(**dpo) -> TrainConfig:
    return TrainConfig(rlhf_type="dpo", lora_dropout=0.0, dpo=DpoConfig(beta=BETA, **dpo))


@pytest.fixture(scope="module")
def policy(default_model):
    """Our LoRA policy with random B matrices (PEFT's zeros would make policy == reference)."""
    torch.manual_seed(0)
    model = modeling.build_model(lora_config(), default_model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def ours(policy, rows, **dpo):
    """(loss, metrics) of our dpo method on one micro-batch of `rows`."""
    policy.zero_grad(set_to_none=True)
    method = methods.get("dpo")(lora_config(**dpo), distributed.Engine(policy, None, distributed.World()).forward,
                                policy, None)
    micro = method.collate(rows, pad_id=0)
    loss, metrics = method.loss(micro, method.counts(micro))
    return loss, {name: float(value) for name, value in metrics.items()}


def trl_example(row: data.PairRow) -> dict[str, list[int]]:
    """The pair as TRL's collator takes it: the prompt (tokens before the first label), then each
    answer's labelled tokens. Tokens after the last label (ChatML's newline after <|im_end|>)
    are left out: a causal model's log-probs of earlier tokens do not depend on them."""
    def split(side: data.Row) -> tuple[list[int], list[int]]:
        labelled = np.flatnonzero(side.labels != data.IGNORE_INDEX)
        assert (labelled == np.arange(labelled[0], labelled[-1] + 1)).all(), "labels must be one span"
        return side.input_ids[:labelled[0]].tolist(), side.input_ids[labelled[0]:labelled[-1] + 1].tolist()

    prompt, chosen = split(row.chosen)
    rejected_prompt, rejected = split(row.rejected)
    assert prompt == rejected_prompt
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def trl_trainer(default_model, policy, tmp_path, **args):
    """TRL's DPOTrainer on the base model with the same LoRA config, its adapter weights set to ours."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    text = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                               "rejected": [{"role": "assistant", "content": r}]} for q, a, r in PAIRS])
    trainer = DPOTrainer(model=base, args=DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=BETA,
                                                    dataset_num_proc=None, **args),
                         train_dataset=text, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(policy))
    return trainer


def trl_loss(trainer, rows):
    """(loss, metrics) from TRL's compute_loss on its own collated batch of the same pairs."""
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    batch = trainer.data_collator([trl_example(row) for row in rows])
    loss = trainer.compute_loss(trainer.model, batch)
    mode = "train" if trainer.model.training else "eval"
    return loss, {name: values[-1] for name, values in trainer._metrics[mode].items()}


@pytest.fixture(scope="module")
def trl(default_model, policy, tmp_path_factory):
    return trl_trainer(default_model, policy, tmp_path_factory.mktemp("trl"), label_smoothing=0.1,
                       loss_type=["exo_pair"])


def test_we_support_exactly_trls_loss_types_and_ms_swifts_aot_pair():
    assert set(DPO_LOSS_TYPES) == set(dpo_losses.LOSSES) == set(TRL_LOSS_TYPES) | {"aot_pair"}


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_each_loss_type_equals_trls_on_the_same_model_and_pairs(loss_type, trl, policy, pair_rows):
    smoothing = 0.1 if loss_type in SMOOTHED else 0.0
    # one trainer for all: these are the attributes its __init__ sets from DPOConfig's loss_type,
    # loss_weights and label_smoothing; the loss is its own _compute_loss
    trl.loss_types, trl.loss_weights, trl.label_smoothing = [loss_type], [1.0], smoothing
    expected, expected_metrics = trl_loss(trl, pair_rows)
    got, metrics = ours(policy, pair_rows, loss_type=[loss_type], label_smoothing=smoothing)
    got, expected = float(got), float(expected)
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (got, expected)
    for name, value in metrics.items():
        assert abs(value - expected_metrics[name]) <= 1e-5 * max(1.0, abs(value)), (name, value, expected_metrics[name])
    # the pairs must tell the loss types apart: rewards far from 0, both signs of margin
    margins = expected_metrics["rewards/margins"]
    assert abs(expected_metrics["rewards/chosen"]) > 0.05 and 0 < expected_metrics["rewards/accuracies"] < 1, margins


def test_gradients_equal_trls(trl, policy, pair_rows):
    trl.loss_types, trl.loss_weights, trl.label_smoothing = ["sigmoid"], [1.0], 0.0
    trl_loss(trl, pair_rows)[0].backward()
    ours(policy, pair_rows)[0].backward()
    theirs = {name: p.grad for name, p in trl.model.named_parameters() if p.requires_grad}
    mine = {name: p.grad for name, p in policy.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys() and mine
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert scale > 1e-4
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_several_loss_types_with_weights_equal_trls_mix(default_model, policy, pair_rows, tmp_path):
    """MPO: TRL's DPOConfig(loss_type=[...], loss_weights=[...]) as given, no attribute set by hand."""
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    expected, _ = trl_loss(trl_trainer(default_model, policy, tmp_path, loss_type=types, loss_weights=weights),
                           pair_rows)
    got, _ = ours(policy, pair_rows, loss_type=types, loss_weights=weights)
    assert abs(float(got) - float(expected)) <= 1e-5, (float(got), float(expected))


def test_rpo_alpha_is_trls_sigmoid_plus_sft_mix(trl, policy, pair_rows):
    """ms-swift's rpo_alpha (gone from TRL 1.16) adds alpha x the chosen NLL per chosen token:
    TRL 1.16's loss types [sigmoid, sft] weighted [1, alpha]."""
    trl.loss_types, trl.loss_weights, trl.label_smoothing = ["sigmoid", "sft"], [1.0, 0.5], 0.0
    expected, _ = trl_loss(trl, pair_rows)
    got, _ = ours(policy, pair_rows, rpo_alpha=0.5)
    plain, _ = ours(policy, pair_rows)
    assert abs(float(got) - float(expected)) <= 1e-5
    assert float(got) - float(plain) > 0.5  # the NLL term is there (a per-token NLL of a few nats)


def test_label_smoothing_smooths_sigmoid_as_ms_swift_cdpo(policy, pair_rows, trl):
    """TRL 1.16 ignores label_smoothing for sigmoid; ms-swift applies it (cDPO):
    -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d), d the log-ratio margin."""
    trl.loss_types, trl.loss_weights, trl.label_smoothing = ["sigmoid"], [1.0], 0.0
    _, metrics = trl_loss(trl, pair_rows)
    got, _ = ours(policy, pair_rows, label_smoothing=0.2)
    plain, _ = ours(policy, pair_rows)
    # the margins per pair, from our own metrics' inputs: recompute d from the method's pair log-probs
    method = methods.get("dpo")(lora_config(), distributed.Engine(policy, None, distributed.World()).forward, policy,
                                None)
    micro = method.collate(pair_rows, 0)
    with torch.no_grad():
        from services.trainer import pairs

        reference = method.reference_logps(micro)
        logps = pairs.pair_logps(policy(**micro.model_inputs()).logits, micro)
    d = (logps.chosen - reference[micro.extras["chosen"]]) - (logps.rejected - reference[micro.extras["rejected"]])
    expected = (-(1 - 0.2) * F.logsigmoid(BETA * d) - 0.2 * F.logsigmoid(-BETA * d)).mean()
    assert abs(float(got) - float(expected)) <= 1e-6
    assert abs(float(plain) - float((-F.logsigmoid(BETA * d)).mean())) <= 1e-6
    assert abs(float(got) - float(plain)) > 1e-3
    assert abs(BETA * float(d.mean()) - metrics["rewards/margins"]) <= 1e-5  # the same d as TRL's


# --- the pure functions, on tensors

def scores(seed: int = 0, pairs: int = 6) -> dpo_losses.Pairs:
    gen = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(pairs, generator=gen, dtype=torch.float64) * 30 for _ in range(4)]
    return dpo_losses.Pairs(*logps, torch.randint(1, 20, (pairs,), generator=gen),
                            torch.randint(1, 20, (pairs,), generator=gen))


def test_mixed_loss_divides_each_part_by_the_steps_pairs_or_chosen_tokens():
    x = scores()
    params = dpo_losses.Params(beta=0.3, label_smoothing=0.1)
    got = dpo_losses.mixed_loss(x, params, ["sigmoid", "sft"], [2.0, 0.5], rpo_alpha=0.25, num_pairs=10,
                                num_chosen_tokens=70)
    d = 0.3 * x.delta
    sigmoid = (-0.9 * F.logsigmoid(d) - 0.1 * F.logsigmoid(-d)).sum() / 10
    nll = -x.chosen_logps.sum() / 70
    assert torch.allclose(got, 2.0 * sigmoid + 0.5 * nll + 0.25 * nll)


def test_a_step_of_micro_batches_sums_to_the_whole_batchs_loss():
    """The normalisation that makes accumulation exact, for every loss type that does not sort
    across its batch (aot, aot_unpaired do, in TRL too)."""
    x = scores(pairs=8)
    params = dpo_losses.Params(beta=0.2, label_smoothing=0.1)
    for loss_type in sorted(set(DPO_LOSS_TYPES) - dpo_losses.BATCH_DEPENDENT):
        whole = dpo_losses.mixed_loss(x, params, [loss_type], None, 0.5, 8, int(x.chosen_tokens.sum()))
        parts = sum(dpo_losses.mixed_loss(dpo_losses.Pairs(*(t[s] for t in (
            x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps, x.chosen_tokens,
            x.rejected_tokens))), params, [loss_type], None, 0.5, 8, int(x.chosen_tokens.sum()))
            for s in (slice(0, 3), slice(3, 4), slice(4, 8)))
        assert torch.allclose(whole, parts), loss_type


def test_the_rewards_are_beta_times_the_log_ratios_detached():
    x = scores()
    chosen = x.chosen_logps.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_losses.dpo_loss(chosen, x.rejected_logps, x.ref_chosen_logps,
                                                                   x.ref_rejected_logps, beta=0.5)
    assert torch.equal(chosen_rewards, 0.5 * (x.chosen_logps - x.ref_chosen_logps))
    assert torch.equal(rejected_rewards, 0.5 * (x.rejected_logps - x.ref_rejected_logps))
    assert not chosen_rewards.requires_grad and losses.requires_grad


def test_policy_equal_to_reference_gives_ln_2_for_sigmoid():
    logps = -torch.rand(5) * 10
    losses, _, _ = dpo_losses.dpo_loss(logps, logps, logps, logps, beta=0.1)
    assert torch.equal(losses, torch.full((5,), math.log(2), dtype=losses.dtype))


def test_per_token_loss_types_need_token_counts():
    x = scores()
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_losses.dpo_loss(x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps, 0.1, "ipo")


def test_bad_dpo_arguments_are_each_named():
    problems = DpoConfig(beta=0, loss_type=["sigmoid", "nope"], loss_weights=[1.0], label_smoothing=0.5,
                         rpo_alpha=-1, discopop_tau=0).problems()
    assert problems == [
        "beta: must be positive; got 0",
        f"loss_type: expected one or more of {', '.join(DPO_LOSS_TYPES)}; got nope",
        "loss_weights: 1 weights for 2 loss types",
        "label_smoothing: must be in [0, 0.5); got 0.5",
        "rpo_alpha: must not be negative; got -1",
        "discopop_tau: must be positive; got 0",
    ]
    assert DpoConfig(loss_type=["exo_pair"]).problems() == [
        "label_smoothing: loss_type exo_pair needs it positive (the EXO paper recommends 1e-3)"]
