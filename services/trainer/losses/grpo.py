"""The GRPO loss: group-relative advantages (--scale_rewards), the clipped per-token objective
with the k3 KL to the reference (--epsilon, --epsilon_high, --beta), and the reduction of each
--loss_type (grpo, bnpo, dr_grpo, dapo) written as sums the method divides by the step's totals.

Pure functions of tensors, equal to TRL 1.16's GRPOTrainer (`_generate_and_score_completions`
for the advantages, `_compute_loss` for the loss and its logged metrics) with TRL's options set
to ms-swift's semantics: `use_bias_correction_kl=False` (TRL's default True multiplies the KL by
the ratio), no vLLM importance-sampling correction, `delta=None`, `top_entropy_quantile=1.0`,
`off_policy_mask_threshold=None`, `importance_sampling_level="token"`, `entropy_coef=0`.

Normalisation. TRL divides each micro-batch by its own size and the accumulation steps; here a
micro-batch returns its summed share (`numerator`) and the method divides it by the step's totals
(`counts` summed over micro-batches and ranks, methods/__init__.py), so splitting a step into
micro-batches or ranks does not change the update (grpo, dr_grpo, dapo; bnpo is a per-micro-batch
token mean by definition, see `numerator`). With equal micro-batches TRL's value is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4  # TRL and ms-swift: (r - mean) / (std + 1e-4)
METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


# ---- advantages ----------------------------------------------------------------------------

def reward_sums(rewards: torch.Tensor) -> list[float]:
    """[count, sum, sum of squares] of this rank's rewards, in float64: what `--scale_rewards
    batch` all-reduces (distributed.all_sum) so `batch_std` sees every rank's completions."""
    values = rewards.detach().double()
    return [float(values.numel()), float(values.sum()), float((values * values).sum())]


def batch_std(sums: list[float]) -> float:
    """The unbiased standard deviation (torch.std's, TRL's nanstd) of all rewards from their
    `reward_sums` added over ranks. Fewer than two rewards: 0 (as TRL)."""
    count, total, squares = sums
    if count < 2:
        return 0.0
    variance = (squares - total * total / count) / (count - 1)
    return max(variance, 0.0) ** 0.5  # float64 rounding can leave -1e-17 for equal rewards


def _check_groups(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> None:
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}")
    if num_generations < 2:
        raise ValueError(f"num_generations: a group needs at least 2 completions; got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards: expected [groups x num_generations={num_generations}] values in one dimension "
                         f"(each prompt's completions adjacent); got shape {tuple(rewards.shape)}")


def reward_std(rewards: torch.Tensor, num_generations: int, scale_rewards: str,
               batch_sums: list[float] | None = None) -> torch.Tensor:
    """[N]: the standard deviation each completion's advantage is scaled by: its group's
    (`group`, and `none`, where TRL computes it only to log the groups whose rewards are all
    equal, frac_reward_zero_std), or the whole rollout's (`batch`: over `batch_sums`, every
    rank's `reward_sums` added; None: this tensor alone, one process)."""
    _check_groups(rewards, num_generations, scale_rewards)
    if scale_rewards == "batch":
        std = batch_std(batch_sums if batch_sums is not None else reward_sums(rewards))
        return torch.full_like(rewards, std)
    return rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations)


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str,
               batch_sums: list[float] | None = None) -> torch.Tensor:
    """[N] GRPO advantages of rewards [N] (groups of `num_generations` adjacent completions of
    one prompt): reward - its group's mean, divided by (std + 1e-4) unless `none`. The mean is
    always the group's, also with `batch`, whose std is the whole rollout's (TRL 1.16)."""
    std = reward_std(rewards, num_generations, scale_rewards, batch_sums)  # checks the shapes first
    centred = rewards - rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations)
    return centred if scale_rewards == "none" else centred / (std + STD_EPSILON)


# ---- per-token objective -------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """The GRPO flags the loss reads (ms-swift's names and defaults; beta's default is the
    method's to set: ms-swift 0.04, 0 loads no reference)."""

    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (symmetric clipping)
    beta: float = 0.0
    max_completion_length: int = 512  # dr_grpo's constant normaliser

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class Terms(NamedTuple):
    """Per completion token ([B, T] each): the loss, the KL to the reference (None when beta
    is 0), and where the clip bound is active (ratio below 1 - epsilon with a negative
    advantage; above 1 + epsilon_high with a positive one)."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor


def per_token(logps: torch.Tensor, advantages: torch.Tensor, params: Params,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None) -> Terms:
    """The per-token GRPO objective:
    -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta (exp(ref - logp) - (ref - logp) - 1)
    with r = exp(logp - old_logp) (old_logps None: the policy's own, detached, as when
    --num_iterations is 1: r = 1, gradient A). logps, old_logps, ref_logps: [B, T] completion
    tokens' log-probs, each of the logits divided by --temperature (TRL and ms-swift score
    completions at the sampling temperature); advantages: [B] (or [B, T])."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - params.epsilon, 1 + params.high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if params.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs (ref_logps)")
        # k3 of Schulman's estimators, not multiplied by the ratio (ms-swift; TRL's use_bias_correction_kl off)
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + params.beta * kl
    return Terms(loss, kl, (ratio < 1 - params.epsilon) & (advantages < 0),
                 (ratio > 1 + params.high) & (advantages > 0))


# ---- reduction over the step ---------------------------------------------------------------

def counts(mask: torch.Tensor) -> dict[str, int]:
    """This micro-batch's share of the step's normalisers (the method's `counts`): its
    completions (every row of mask [B, T] is one), their completion tokens (mask's ones) and
    one micro-batch."""
    return {"sequences": int(mask.size(0)), "completion_tokens": int(mask.sum()), "micro_batches": 1}


def numerator(values: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What a micro-batch adds to the step's loss before `normaliser` divides it (values, mask:
    [B, T]): grpo: the sum over its completions of each one's token mean; dr_grpo, dapo: the sum
    over its completion tokens; bnpo: its own token mean (TRL's bnpo normalises by the tokens of
    the micro-batch on its rank, the difference from dapo, which normalises by the step's)."""
    mask = mask.to(values.dtype)
    if loss_type == "grpo":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if loss_type == "bnpo":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type in ("dr_grpo", "dapo"):
        return (values * mask).sum()
    raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")


def normaliser(loss_type: str, step: dict[str, int], max_completion_length: int) -> int:
    """What the step's summed `numerator`s are divided by (step: `counts` summed over the
    step's micro-batches and every rank): grpo: completions; bnpo: micro-batches (the mean of
    their token means; DDP averages ranks); dr_grpo: completions x max_completion_length;
    dapo: completion tokens. At least 1, so an empty step gives 0, not NaN."""
    if loss_type == "grpo":
        total = step["sequences"]
    elif loss_type == "bnpo":
        total = step["micro_batches"]
    elif loss_type == "dr_grpo":
        total = step["sequences"] * max_completion_length
    elif loss_type == "dapo":
        total = step["completion_tokens"]
    else:
        raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return max(int(total), 1)


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, step: dict[str, int],
              params: Params, old_logps: torch.Tensor | None = None,
              ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's GRPO loss and TRL's logged metrics, each divided by the step's totals
    (`step`: `counts` summed over the step's micro-batches and every rank), so summing the
    micro-batches and ranks gives the step's values. mask: [B, T] completion tokens trained on.

    Metrics (TRL's names): `kl` (beta 0: 0) and `clip_ratio/{low,high,region}_mean`, the
    step's token means. TRL logs the mean over micro-batches of each micro-batch's token mean:
    the same with one micro-batch or equal token counts. TRL's clip_ratio/low_min and
    high_max (extremes over completions) are not sums and are not logged."""
    terms = per_token(logps, advantages, params, old_logps, ref_logps)
    loss = numerator(terms.loss, mask, params.loss_type) / normaliser(params.loss_type, step,
                                                                       params.max_completion_length)
    tokens = max(int(step["completion_tokens"]), 1)
    weights = mask.to(logps.dtype)
    with torch.no_grad():
        kl = (terms.kl * weights).sum() if terms.kl is not None else logps.new_zeros(())
        metrics = {
            "kl": kl / tokens,
            "clip_ratio/low_mean": (terms.low_clipped * weights).sum() / tokens,
            "clip_ratio/high_mean": (terms.high_clipped * weights).sum() / tokens,
            "clip_ratio/region_mean": ((terms.low_clipped | terms.high_clipped) * weights).sum() / tokens,
        }
    return loss, metrics
