"""An online step's micro-batches grouped by length (services.trainer.batching): the cut is the
cheapest one (brute force over every split), never more rows nor more padded tokens a
micro-batch than the plain layout, and a GRPO step trained on them (with logits only from the
first completion token on) has the loss, metrics and gradients of the plain layout's single
padded micro-batch with every position's logits."""

import itertools
import random

import numpy as np
import pytest
import torch

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import batching, data, modeling
from services.trainer.config import GrpoConfig, TrainConfig
from services.trainer.logprobs import token_logps
from services.trainer.losses import grpo as losses
from services.trainer.methods import grpo
from services.trainer.rollout.base import Completion

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def splits(n: int, max_rows: int):
    """Every split of n sorted rows into consecutive runs of at most max_rows."""
    for cut_count in range(n):
        for cuts in itertools.combinations(range(1, n), cut_count):
            ends = [*cuts, n]
            starts = [0, *cuts]
            if all(end - start <= max_rows for start, end in zip(starts, ends)):
                yield list(zip(starts, ends))


@pytest.mark.parametrize("seed", range(6))
def test_the_cut_is_the_cheapest_and_never_worse_than_the_plain_layout(seed):
    rng = random.Random(seed)
    n, max_rows = rng.randint(1, 9), rng.randint(1, 5)
    lengths = [rng.randint(3, 200) for _ in range(n)]
    groups = batching.length_groups(lengths, max_rows)
    assert sorted(i for group in groups for i in group) == list(range(n))
    assert all(1 <= len(group) <= max_rows for group in groups)
    ordered = sorted(lengths)
    cost = lambda runs: sum((end - start) * ordered[end - 1] + batching.MICRO_BATCH_TOKENS  # noqa: E731
                            for start, end in runs)
    cheapest = min(cost(runs) for runs in splits(n, max_rows))
    assert batching.padded_tokens(lengths, groups) + batching.MICRO_BATCH_TOKENS * len(groups) == cheapest
    plain = [list(range(start, min(start + max_rows, n))) for start in range(0, n, max_rows)]
    assert batching.padded_tokens(lengths, groups) <= batching.padded_tokens(lengths, plain)
    assert max(len(g) * max(lengths[i] for i in g) for g in groups) <= max_rows * max(lengths)

    for count in range(1, n + 1):  # ranks agreeing on a count: that many (as max_rows allows), fewest padded
        exact = batching.length_groups(lengths, max_rows, count)
        assert sorted(i for group in exact for i in group) == list(range(n))
        assert len(exact) == max(count, -(-n // max_rows))
        least = min(sum((end - start) * ordered[end - 1] for start, end in runs)
                    for runs in splits(n, max_rows) if len(runs) == len(exact))
        assert batching.padded_tokens(lengths, exact) == least


def test_a_step_of_length_grouped_micro_batches_trains_as_one_plain_micro_batch(default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", lora_rank=4, seed=3, rlhf_type="grpo",
                         per_device_train_batch_size=8,
                         grpo=GrpoConfig(num_generations=4, max_completion_length=40, reward_funcs=["format"],
                                         beta=0.04, temperature=0.7))
    torch.manual_seed(3)
    policy = modeling.build_model(config, default_model)
    with torch.no_grad():  # a LoRA B of zeros would make the policy the reference: make the KL term count
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    policy.eval()  # no LoRA dropout: the two layouts' forwards are compared
    method = grpo.Grpo(config, policy, policy, tokenizer)
    assert method.keep_logits  # the default model's forward takes logits_to_keep

    rng = random.Random(0)
    prompt_ids = [[rng.randint(3, 3000) for _ in range(length)] for length in (9, 23)]
    groups = [[Completion(tuple(rng.randint(3, 3000) for _ in range(length)), True) for length in lengths]
              for lengths in ((1, 40, 7, 18), (3, 33, 2, 25))]
    advantages = torch.tensor([0.5, -1.0, 1.5, -0.25, 1.0, -0.5, 0.75, -1.25])

    micro_batches = method._micro_batches(prompt_ids, groups, advantages)
    assert len(micro_batches) > 1  # grouped by length: the one plain micro-batch was split
    for micro in micro_batches:
        micro.extras["ref_logps"] = method._token_logps(micro, method.reference.forward)
    step = {}
    for micro in micro_batches:
        for name, value in method.counts(micro).items():
            step[name] = step.get(name, 0) + value
    policy.zero_grad()
    total, logged = 0.0, dict.fromkeys(losses.METRICS, 0.0)
    for micro in micro_batches:
        loss, metrics = method.loss(micro, step)
        loss.backward()
        total += loss.item()
        for name, value in metrics.items():
            logged[name] += float(value)
    grouped = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}

    # the plain layout: every completion in one right-padded micro-batch, logits at every position
    rows = []
    for prompt, group in zip(prompt_ids, groups):
        for completion in group:
            ids = np.array(prompt + list(completion.token_ids), dtype=np.int32)
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
            labels[len(prompt):] = ids[len(prompt):]
            rows.append(data.Row(ids, labels))
    plain = data.collate(rows, tokenizer.pad_token_id)
    with torch.no_grad(), policy.disable_adapter():
        ref_logps, _ = token_logps(policy(**plain.model_inputs()).logits / 0.7, plain.labels)
    policy.zero_grad()
    logps, mask = token_logps(policy(**plain.model_inputs()).logits / 0.7, plain.labels)
    assert step == {**losses.counts(mask), "micro_batches": len(micro_batches)}  # micro_batches: bnpo's alone
    loss, metrics = losses.grpo_loss(logps, advantages, mask, step, method.params, ref_logps=ref_logps)
    loss.backward()
    assert total == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    for name, value in metrics.items():
        assert logged[name] == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert grouped.keys() and grouped.keys() == {n for n, p in policy.named_parameters() if p.grad is not None}
    for name, parameter in policy.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(grouped[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bnpo_keeps_the_rollout_order_in_micro_batches_of_the_batch_size(default_model):
    from transformers import AutoTokenizer

    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", lora_rank=4, rlhf_type="grpo",
                         per_device_train_batch_size=3,
                         grpo=GrpoConfig(num_generations=2, max_completion_length=8, reward_funcs=["format"],
                                         beta=0.0, loss_type="bnpo"))
    policy = modeling.build_model(config, default_model)
    method = grpo.Grpo(config, policy, policy, AutoTokenizer.from_pretrained(default_model))
    groups = [[Completion((5,) * length, True) for length in pair] for pair in ((8, 1), (2, 7))]
    micro_batches = method._micro_batches([[4, 4], [4, 4, 4]], groups, torch.arange(4.0))
    assert [m.extras["advantages"].tolist() for m in micro_batches] == [[0.0, 1.0, 2.0], [3.0]]
