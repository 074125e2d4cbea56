"""ORPO (--rlhf_type orpo): the chosen answers' NLL plus beta x the odds-ratio term of each
pair's length-normalised log-probs, without a reference model. The pair terms are normalised
by the step's pairs, the NLL by the step's chosen answer tokens (both over every micro-batch
and rank), so accumulation and ranks do not change the update. Pairs unpacked or packed."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from services.trainer import data, modeling, packing, pairs
from services.trainer.config import METHOD_KINDS
from services.trainer.losses.nll import chosen_nll
from services.trainer.losses.orpo import orpo_loss


class Orpo:
    name: ClassVar[str] = "orpo"
    kinds, needs = METHOD_KINDS["orpo"]
    metrics: ClassVar[tuple[str, ...]] = pairs.REWARD_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        self.forward = forward
        self.dtype, self.attention = model.dtype, packing.attention_path(model)
        self.beta = config.orpo.beta

    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        return pairs.collate(rows, pad_id)

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"pairs": pairs.count(micro), "chosen_tokens": pairs.chosen_tokens(micro)}

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.forward(**micro.model_inputs(self.dtype, self.attention)).logits  # [b, s, vocab]
        logps = pairs.pair_logps(logits, micro)
        chosen, rejected = logps.means()
        losses, ratio, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, self.beta)
        nll = chosen_nll(logps.chosen, step["chosen_tokens"])
        num_pairs = max(step["pairs"], 1)
        metrics = pairs.reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected, num_pairs)
        ratio = ratio.detach()
        # TRL's names: log_odds_ratio is the mean log sigmoid of the log-odds ratio, log_odds_chosen the ratio's mean
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": F.logsigmoid(ratio).sum() / num_pairs,
                        "log_odds_chosen": ratio.sum() / num_pairs})
        return nll + losses.sum() / num_pairs, metrics


METHOD = Orpo
