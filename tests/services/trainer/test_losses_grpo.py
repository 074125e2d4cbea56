"""The GRPO loss (services.trainer.losses.grpo) against TRL 1.16's GRPOTrainer on the same
tensors: advantages for each --scale_rewards through TRL's `_generate_and_score_completions`
(real generation by the tiny default model, rewards from a reward function returning set
values), the loss of each --loss_type and its logged metrics through TRL's `_compute_loss` with
clipping active, epsilon_high != epsilon, beta 0 and > 0; and the step-total normalisation:
2 micro-batches (or 2 ranks) equal one batch.

TRL is configured to ms-swift's semantics: use_bias_correction_kl=False (TRL's default True),
vllm_importance_sampling_correction=False (only read with use_vllm; TRL's default True),
importance_sampling_level="token", delta=None, top_entropy_quantile=1.0,
off_policy_mask_threshold=None, entropy_coef=0.0, mask_truncated_completions=False,
multi_objective_aggregation="sum_then_normalize" (these are TRL's defaults, named so a change
of default cannot pass unnoticed)."""

from __future__ import annotations

import pytest
import torch

from services.trainer.losses import grpo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MS_SWIFT_SEMANTICS = dict(use_bias_correction_kl=False, vllm_importance_sampling_correction=False,
                          importance_sampling_level="token", delta=None, top_entropy_quantile=1.0,
                          off_policy_mask_threshold=None, entropy_coef=0.0, mask_truncated_completions=False,
                          multi_objective_aggregation="sum_then_normalize")
MAX_COMPLETION_LENGTH = 7
GENERATIONS = 4


class SetRewards:
    """A reward function returning the values set before TRL's rollout, in completion order."""

    __name__ = "set_rewards"

    def __init__(self):
        self.values: list[float] = []

    def __call__(self, completions, **kwargs) -> list[float]:
        assert len(completions) == len(self.values)
        return list(self.values)


@pytest.fixture(scope="module")
def make_trainer(tmp_path_factory):
    """TRL's GRPOTrainer built by its own constructor from a GRPOConfig (so every attribute its
    loss reads is TRL's), on the tiny default model; one per configuration, cached."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from libs.default_model.resolve import resolve_model

    model_dir = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"prompt": "Question: name a colour.\nAnswer:"}])
    built = {}

    def make(gradient_accumulation_steps=1, **options):
        key = (gradient_accumulation_steps, tuple(sorted(options.items())))
        if key not in built:
            rewards = SetRewards()
            args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False, report_to=[],
                              per_device_train_batch_size=8, num_generations=GENERATIONS,
                              gradient_accumulation_steps=gradient_accumulation_steps,
                              max_completion_length=MAX_COMPLETION_LENGTH, temperature=1.0,
                              **{**MS_SWIFT_SEMANTICS, **options})
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                                  processing_class=tokenizer)
            trainer.model.train()
            built[key] = (trainer, rewards)
        return built[key]

    return make


# ---- advantages ----------------------------------------------------------------------------

# 4 prompts x 4 completions: distinct rewards, a group of equal rewards (std 0), negative and fractional
REWARDS = [1.0, 0.0, 2.0, 0.5,
           3.0, 3.0, 3.0, 3.0,
           -1.0, 0.25, 0.0, 4.0,
           0.1, 0.2, 0.3, 0.9]


def trl_advantages(make_trainer, scale_rewards: str, rewards: list[float]) -> tuple[torch.Tensor, float]:
    trainer, reward_func = make_trainer(scale_rewards=scale_rewards)
    reward_func.values = rewards
    trainer._metrics["train"].clear()
    prompts = [{"prompt": f"Question {i // GENERATIONS}: name a colour.\nAnswer:"} for i in range(len(rewards))]
    torch.manual_seed(0)
    output = trainer._generate_and_score_completions(prompts)
    return output["advantages"], trainer._metrics["train"]["frac_reward_zero_std"][-1]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(make_trainer, scale_rewards):
    expected, zero_std = trl_advantages(make_trainer, scale_rewards, REWARDS)
    rewards = torch.tensor(REWARDS)
    ours = grpo.advantages(rewards, GENERATIONS, scale_rewards)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    std = grpo.reward_std(rewards, GENERATIONS, scale_rewards)
    assert float(torch.isclose(std, torch.zeros_like(std)).float().mean()) == zero_std
    assert ours[4:8].tolist() == [0.0] * 4  # the group of equal rewards teaches nothing


def test_advantages_written_out():
    """The formula on numbers worked by hand: group [1, 3], mean 2, unbiased std sqrt(2)."""
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0], dtype=torch.float64)
    s2 = 2 ** 0.5
    torch.testing.assert_close(grpo.advantages(rewards, 2, "group"),
                               torch.tensor([-1 / (s2 + 1e-4), 1 / (s2 + 1e-4), 0.0, 0.0], dtype=torch.float64))
    # batch: the group's mean, the whole batch's std (of 1, 3, 5, 5: mean 3.5, var 11/3)
    batch = (11 / 3) ** 0.5
    torch.testing.assert_close(grpo.advantages(rewards, 2, "batch"),
                               torch.tensor([-1, 1, 0, 0], dtype=torch.float64) / (batch + 1e-4))
    torch.testing.assert_close(grpo.advantages(rewards, 2, "none"), torch.tensor([-1.0, 1, 0, 0], dtype=torch.float64))


def test_batch_scaling_over_two_ranks_equals_one_process(make_trainer):
    """Each rank holds whole groups; the all-reduced reward_sums give every rank the step's std."""
    expected, _ = trl_advantages(make_trainer, "batch", REWARDS)
    halves = [torch.tensor(REWARDS[:8]), torch.tensor(REWARDS[8:])]
    summed = [a + b for a, b in zip(*(grpo.reward_sums(half) for half in halves))]
    ours = torch.cat([grpo.advantages(half, GENERATIONS, "batch", batch_sums=summed) for half in halves])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # without the all-reduce each rank would scale by its own std: different, so the sums matter
    alone = torch.cat([grpo.advantages(half, GENERATIONS, "batch") for half in halves])
    assert (alone - expected).abs().max() > 0.1


def test_advantages_refuse_bad_groups():
    with pytest.raises(ValueError, match="num_generations=4"):
        grpo.advantages(torch.zeros(6), 4, "group")
    with pytest.raises(ValueError, match="scale_rewards: expected one of group, batch, none; got 'std'"):
        grpo.advantages(torch.zeros(8), 4, "std")
    with pytest.raises(ValueError, match="at least 2"):
        grpo.advantages(torch.zeros(8), 1, "group")


# ---- the loss ------------------------------------------------------------------------------

def batch(seed: int = 0, sequences: int = 6):
    """Completion log-probs with old/ref log-probs far enough off that ratios leave [0.8, 1.28]
    on both sides, advantages of both signs, completions of different lengths (right padding)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sequences, MAX_COMPLETION_LENGTH)
    logps = -torch.rand(shape, generator=generator) * 3
    old_logps = logps + torch.randn(shape, generator=generator) * 0.6
    ref_logps = logps + torch.randn(shape, generator=generator) * 0.5
    advantages = torch.rand(sequences, generator=generator) * 2 + 0.1
    advantages[::2] *= -1  # both signs, so both clip bounds bite
    lengths = torch.tensor([7, 1, 4, 6, 2, 5, 3, 7][:sequences])
    mask = (torch.arange(MAX_COMPLETION_LENGTH)[None, :] < lengths[:, None]).long()
    return logps, old_logps, ref_logps, advantages, mask


def trl_loss(trainer, logps, old_logps, ref_logps, advantages, mask, num_items_in_batch, accumulation=1):
    """TRL's `_compute_loss` on these log-probs: its policy forward replaced by the given
    [B, T] log-probs (a leaf, so its gradient is TRL's), every other line TRL's own."""
    leaf = logps.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (leaf, torch.zeros_like(leaf), None)
    trainer.current_gradient_accumulation_steps = accumulation  # the transformers loop sets it per step
    trainer._metrics["train"].clear()
    sequences, length = mask.shape
    inputs = {"prompt_ids": torch.zeros(sequences, 2, dtype=torch.long),
              "prompt_mask": torch.ones(sequences, 2, dtype=torch.long),
              "completion_ids": torch.zeros(sequences, length, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": torch.tensor(num_items_in_batch)}
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), leaf.grad, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def ours(logps, old_logps, ref_logps, advantages, mask, step, params):
    leaf = logps.clone().requires_grad_(True)
    loss, metrics = grpo.grpo_loss(leaf, advantages, mask, step, params, old_logps=old_logps,
                                   ref_logps=ref_logps if params.beta else None)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


CASES = [(epsilon_high, beta) for epsilon_high in (None, 0.28) for beta in (0.0, 0.04)]


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("epsilon_high,beta", CASES)
def test_loss_equals_trl(make_trainer, loss_type, epsilon_high, beta):
    logps, old_logps, ref_logps, advantages, mask = batch()
    params = grpo.Params(loss_type=loss_type, epsilon=0.2, epsilon_high=epsilon_high, beta=beta,
                         max_completion_length=MAX_COMPLETION_LENGTH)
    terms = grpo.per_token(logps, advantages, params, old_logps, ref_logps if beta else None)
    real = mask.bool()
    assert (terms.low_clipped & real).sum() >= 2 and (terms.high_clipped & real).sum() >= 2  # clipping is active
    trainer, _ = make_trainer(loss_type=loss_type, epsilon=0.2, epsilon_high=epsilon_high, beta=beta)
    expected, expected_grad, logged = trl_loss(trainer, logps, old_logps, ref_logps, advantages, mask,
                                               num_items_in_batch=int(mask.sum()))
    loss, grad, metrics = ours(logps, old_logps, ref_logps, advantages, mask, grpo.counts(mask), params)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    if beta == 0:  # a clipped token passes no gradient (with beta, only its KL's)
        assert (grad[terms.low_clipped | terms.high_clipped] == 0).all()
    for name in grpo.METRICS:
        if name == "kl" and beta == 0:
            assert "kl" not in logged and float(metrics["kl"]) == 0.0  # TRL logs no kl without a reference
            continue
        assert float(metrics[name]) == pytest.approx(logged[name], abs=1e-6), name


def test_kl_is_not_bias_corrected():
    """ms-swift's KL term is k3 alone; TRL's default (use_bias_correction_kl) multiplies it by the ratio."""
    logps = torch.tensor([[-1.0, -2.0]])
    ref_logps = torch.tensor([[-1.5, -1.0]])
    old_logps = torch.tensor([[-1.2, -2.5]])
    terms = grpo.per_token(logps, torch.tensor([0.0]), grpo.Params(beta=0.1), old_logps, ref_logps)
    d = ref_logps - logps
    torch.testing.assert_close(terms.kl, torch.exp(d) - d - 1)
    torch.testing.assert_close(terms.loss, 0.1 * (torch.exp(d) - d - 1))


def test_trl_default_bias_corrected_kl_differs(make_trainer):
    """TRL's default use_bias_correction_kl=True multiplies the KL by the ratio: not ms-swift's
    loss, so the setting above is what makes the comparison hold."""
    logps, old_logps, ref_logps, advantages, mask = batch()
    params = grpo.Params(loss_type="grpo", beta=0.5, max_completion_length=MAX_COMPLETION_LENGTH)
    trainer, _ = make_trainer(loss_type="grpo", beta=0.5, use_bias_correction_kl=True)
    trl_default, _, _ = trl_loss(trainer, logps, old_logps, ref_logps, advantages, mask, int(mask.sum()))
    loss, _, _ = ours(logps, old_logps, ref_logps, advantages, mask, grpo.counts(mask), params)
    terms = grpo.per_token(logps, advantages, params, old_logps, ref_logps)
    biased = terms.loss + params.beta * terms.kl * (torch.exp(logps - old_logps) - 1)  # kl x ratio in place of kl
    torch.testing.assert_close(trl_default, grpo.numerator(biased, mask, "grpo") / mask.size(0), rtol=0, atol=1e-6)
    assert abs(float(loss - trl_default)) > 1e-4  # 100x the tolerance the equality tests hold


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_two_micro_batches_or_ranks_equal_one_batch(loss_type):
    """The micro-batches' losses divided by the step's totals add up to the whole batch's
    loss and gradient, however the completions (and their tokens) are split."""
    logps, old_logps, ref_logps, advantages, mask = batch(seed=1, sequences=8)
    params = grpo.Params(loss_type=loss_type, epsilon_high=0.28, beta=0.04, max_completion_length=MAX_COMPLETION_LENGTH)
    whole, whole_grad, whole_metrics = ours(logps, old_logps, ref_logps, advantages, mask, grpo.counts(mask), params)
    for split in ([slice(0, 4), slice(4, 8)], [slice(0, 3), slice(3, 8)]):  # equal, and unequal sizes
        parts = [tuple(x[part] for x in (logps, old_logps, ref_logps, advantages, mask)) for part in split]
        step = {}
        for part in parts:  # as training.step_counts sums the method's counts
            for name, value in grpo.counts(part[-1]).items():
                step[name] = step.get(name, 0) + value
        results = [ours(*part, step, params) for part in parts]
        torch.testing.assert_close(sum(r[0] for r in results), whole, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.cat([r[1] for r in results]), whole_grad, rtol=0, atol=1e-7)
        for name in grpo.METRICS:
            torch.testing.assert_close(sum(r[2][name] for r in results), whole_metrics[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_accumulation_equals_trl(make_trainer, loss_type):
    """Two equal micro-batches accumulated: TRL's summed losses and gradients (each divided by
    its accumulation steps; dapo by the generation batch's tokens) equal ours over step totals."""
    logps, old_logps, ref_logps, advantages, mask = batch(seed=2, sequences=8)
    params = grpo.Params(loss_type=loss_type, epsilon_high=0.28, beta=0.04, max_completion_length=MAX_COMPLETION_LENGTH)
    trainer, _ = make_trainer(gradient_accumulation_steps=2, loss_type=loss_type, epsilon_high=0.28, beta=0.04)
    parts = [tuple(x[part] for x in (logps, old_logps, ref_logps, advantages, mask))
             for part in (slice(0, 4), slice(4, 8))]
    step = {"sequences": 8, "completion_tokens": int(mask.sum()), "micro_batches": 2}
    assert step == {name: sum(grpo.counts(part[-1])[name] for part in parts) for name in step}
    for part in parts:
        expected, expected_grad, _ = trl_loss(trainer, *part, num_items_in_batch=int(mask.sum()), accumulation=2)
        loss, grad, _ = ours(*part, step, params)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)


def test_bnpo_is_a_mean_of_micro_batch_means():
    """bnpo (TRL's definition) normalises each micro-batch by its own tokens: unlike dapo, a
    split with unequal token counts changes it; the mean of the two micro-batch means is it."""
    logps, old_logps, ref_logps, advantages, mask = batch(seed=3, sequences=8)
    params = grpo.Params(loss_type="bnpo")
    parts = (slice(0, 3), slice(3, 8))  # 12 and 23 completion tokens
    step = {"sequences": 8, "completion_tokens": int(mask.sum()), "micro_batches": 2}
    total = sum(grpo.grpo_loss(logps[part], advantages[part], mask[part], step, params, old_logps=old_logps[part])[0]
                for part in parts)
    per_token = grpo.per_token(logps, advantages, params, old_logps).loss

    def mean(part):
        return (per_token[part] * mask[part]).sum() / mask[part].sum()

    torch.testing.assert_close(total, (mean(parts[0]) + mean(parts[1])) / 2)
    whole = mean(slice(0, 8))
    assert abs(float(total - whole)) > 1e-4


def test_empty_step_is_zero_not_nan():
    mask = torch.zeros(2, 3, dtype=torch.long)
    logps = torch.zeros(2, 3, requires_grad=True)
    for loss_type in grpo.LOSS_TYPES:
        loss, metrics = grpo.grpo_loss(logps, torch.ones(2), mask, grpo.counts(mask),
                                       grpo.Params(loss_type=loss_type, max_completion_length=3))
        assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in metrics.values())


def test_params_refuse_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type: expected one of grpo, bnpo, dr_grpo, dapo; got 'cispo'"):
        grpo.Params(loss_type="cispo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo.per_token(torch.zeros(1, 2), torch.ones(1), grpo.Params(beta=0.1))
