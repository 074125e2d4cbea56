"""CPO (--rlhf_type cpo): a preference term on the policy's own log-probs (loss types sigmoid,
hinge, ipo, simpo) plus cpo_alpha x the chosen answers' NLL, without a reference model.
methods.simpo is this method with its loss type fixed to simpo. The pair terms are normalised
by the step's pairs, the NLL by the step's chosen answer tokens (both over every micro-batch
and rank), so accumulation and ranks do not change the update. Pairs unpacked or packed."""

from __future__ import annotations

from typing import ClassVar

import torch

from services.trainer import data, modeling, packing, pairs
from services.trainer.config import METHOD_KINDS
from services.trainer.losses.cpo import AVERAGED, cpo_loss
from services.trainer.losses.nll import chosen_nll


class Cpo:
    name: ClassVar[str] = "cpo"
    kinds, needs = METHOD_KINDS["cpo"]
    metrics: ClassVar[tuple[str, ...]] = pairs.REWARD_METRICS + ("nll_loss",)
    build_model = staticmethod(modeling.build_model)
    fixed_loss_type: ClassVar[str | None] = None  # a method that is CPO with one loss type (SimPO)

    def __init__(self, config, forward, model, tokenizer):
        self.forward = forward
        self.dtype, self.attention = model.dtype, packing.attention_path(model)
        # CpoConfig (SimpoConfig for SimPO): beta, cpo_alpha, label_smoothing, simpo_gamma
        self.args = config.method_config
        self.loss_type = self.fixed_loss_type or self.args.loss_type

    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        return pairs.collate(rows, pad_id)

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"pairs": pairs.count(micro), "chosen_tokens": pairs.chosen_tokens(micro)}

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        logits = self.forward(**micro.model_inputs(self.dtype, self.attention)).logits  # [b, s, vocab]
        logps = pairs.pair_logps(logits, micro)
        chosen, rejected = logps.means() if self.loss_type in AVERAGED else (logps.chosen, logps.rejected)
        losses, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, args.beta, self.loss_type,
                                                            args.label_smoothing, args.simpo_gamma)
        nll = chosen_nll(logps.chosen, step["chosen_tokens"])
        num_pairs = max(step["pairs"], 1)
        loss = losses.sum() / num_pairs
        if args.cpo_alpha:
            loss = loss + args.cpo_alpha * nll
        metrics = pairs.reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected, num_pairs)
        metrics["nll_loss"] = nll.detach()  # logged whatever cpo_alpha (TRL logs 0 when it is 0)
        return loss, metrics


METHOD = Cpo
