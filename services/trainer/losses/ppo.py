"""The PPO losses and advantage estimation (Schulman et al., 2017; GAE: Schulman et al., 2016), with
the semantics of TRL 0.x's PPOTrainer, which ms-swift's PPO runs: per-token rewards that are the
KL penalty -kl_coef x (logp - ref_logp) with the reward model's score added at the completion's
last token, optional whitening of those rewards (masked, mean kept: shift_mean=False), GAE over the
completion tokens, whitened advantages, and the clipped policy and value losses.

Every tensor is [completions, completion tokens], right-padded, with `mask` 1 on the completion's
real tokens (its stop token included) and 0 on padding. The losses are returned per token; the
method sums them over a micro-batch and divides by the step's completion tokens, so the mean is
over the whole optimizer step (TRL's masked_mean over one micro-batch when there is one).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """The variance of the masked values; unbiased (Bessel's n / (n - 1)) as TRL's masked_var."""
    mask = mask.to(values.dtype)
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"whitening needs at least 2 unmasked values, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked values; shift_mean=False adds the mean
    back (TRL whitens rewards so, keeping their sign and level). Masked positions are set to 0."""
    mask = mask.to(values.dtype)
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def penalise_missing_eos(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores - penalty for completions that did not end on a stop token (`finished` False)."""
    if penalty is None:
        return scores
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef x (logp_t - ref_logp_t), plus the score at each completion's
    last real token; returns (rewards, kl), each [completions, tokens], 0 on padding.
    scores: [completions]; logps, ref_logps: the sampled tokens' log-probs under the rollout's
    policy and the reference."""
    mask = mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards = rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the completion tokens:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A zero past
    the last real token; returns (advantages, returns = advantages + values), 0 on padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.size(1)
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate per token: max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio =
    exp(logp - old_logp); returns (losses, clipped) where clipped is 1 where the clipped term won."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logps.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss per token: 0.5 max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2);
    returns (losses, clipped) where clipped is 1 where the clipped term won."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)
