"""The reward model's loss (Bradley-Terry on pairs, as TRL's RewardTrainer): per pair
-log sigmoid(r_chosen - r_rejected - margin), plus center_rewards_coefficient x
(r_chosen + r_rejected)^2 when given, which pulls the rewards towards 0 (Eisenstein et al.,
2023). The mean over pairs of these is TRL's loss; the method divides their sum by the
step's pairs instead, so the mean is over the whole optimizer step."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margins: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """The loss of each pair, [pairs]. chosen_rewards, rejected_rewards: [pairs];
    margins: [pairs] (the dataset's `margin`, 0 where a pair has none), or None for none."""
    difference = chosen_rewards - rejected_rewards
    if margins is not None:
        difference = difference - margins.to(difference)
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


def reward_model_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                   num_pairs: int) -> dict[str, torch.Tensor]:
    """What the reward model logs, each summed over these pairs and divided by the step's
    `num_pairs`: `accuracy` (the share of pairs with r_chosen > r_rejected, TRL's name),
    and the mean rewards and margin under TRL's DPO names (TRL's RewardTrainer calls the
    margin `margin`)."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    total = max(num_pairs, 1)
    return {"accuracy": (chosen > rejected).float().sum() / total, "rewards/chosen": chosen.sum() / total,
            "rewards/rejected": rejected.sum() / total, "rewards/margins": (chosen - rejected).sum() / total}
