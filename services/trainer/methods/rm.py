"""The reward model (--rlhf_type rm): a sequence-classification head with one output on the
base (AutoModelForSequenceClassification, num_labels=1; under LoRA the head trains whole beside
the adapter), trained on chosen/rejected pairs with the Bradley-Terry loss of
services.trainer.losses.reward, normalised by the pairs of the whole step.

A sequence's reward is the head's score at its last token that is not the pad id: the token
transformers pools at, so a published reward model scores as it trained (the two differ where a
tokenizer's pad token is its eos and a sequence ends with it). Transformers finds one such token
per row, which cannot read packed rows (several samples a row); so the head's per-token scores
are taken as it computes them, inside the model's forward (a forward hook: the back end's
wrapping, DDP, FSDP2 or ZeRO, stays whole), and gathered at each sample's own such token from
the micro-batch's sample ids."""

from __future__ import annotations

from typing import ClassVar

import torch

from libs.common.errors import InvalidArgument
from services.trainer import data, modeling, packing, pairs
from services.trainer.config import METHOD_KINDS
from services.trainer.losses.reward import reward_loss, reward_model_metrics

HEAD = "score"  # transformers' name for the classification head of every decoder's *ForSequenceClassification


def build_reward_model(config, model_dir) -> torch.nn.Module:
    """The base of `model_dir` with a one-output classification head (newly initialised from
    the seed unless `model_dir` is a reward model already), its pad token id set: transformers
    pools at the last token that is not padding when the published model is loaded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        model = modeling.build_model(config, model_dir, AutoModelForSequenceClassification, "SEQ_CLS", num_labels=1,
                                     pad_token_id=pad_id)
    except ValueError as exc:  # transformers has no sequence-classification class for this architecture
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise InvalidArgument(f"{model_dir}: transformers has no sequence-classification model for this "
                              f"architecture, so it cannot become a reward model", field="model") from exc
    score_head(model)  # a model without one fails here, before any training
    return model


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (under PEFT: its trained copy's wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, HEAD, None)
    if not isinstance(head, torch.nn.Module):
        raise InvalidArgument(f"{type(base).__name__} has no `{HEAD}` head to read rewards from", field="model")
    return head


def sample_ends(sample_ids: torch.Tensor, input_ids: torch.Tensor, pad_id: int | None,
                num_samples: int) -> torch.Tensor:
    """[num_samples] int64: the flat index (row x seq + position) of each sample's last token
    that is not `pad_id`, transformers' pooling applied to each sample (a sample of pad tokens
    only: its first, as transformers' argmax gives). sample_ids: [batch, seq], -1 on padding
    (data.collate); input_ids: [batch, seq]."""
    flat = sample_ids.reshape(-1)
    real = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    firsts = torch.full((num_samples,), flat.numel(), dtype=torch.long, device=flat.device)
    firsts = firsts.scatter_reduce(0, flat[real], positions[real], reduce="amin")
    scored = real if pad_id is None else real & (input_ids.reshape(-1).to(flat.device) != pad_id)
    return firsts.scatter_reduce(0, flat[scored], positions[scored], reduce="amax")


class RewardModel:
    name: ClassVar[str] = "rm"
    kinds, needs = METHOD_KINDS["rm"]
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins")
    build_model = staticmethod(build_reward_model)

    def __init__(self, config, forward, model, tokenizer):
        self.forward = forward
        self.dtype, self.attention = model.dtype, packing.attention_path(model)
        self.center_rewards_coefficient = config.rm.center_rewards_coefficient
        self.pad_id = model.config.pad_token_id  # what transformers pools by (build_reward_model sets it)
        self._scores: torch.Tensor | None = None
        score_head(model).register_forward_hook(self._keep_scores)

    def _keep_scores(self, _module, _inputs, output: torch.Tensor) -> None:
        self._scores = output  # [batch, seq, 1]

    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        return pairs.collate(rows, pad_id)

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"pairs": pairs.count(micro)}

    def rewards(self, micro: data.MicroBatch) -> torch.Tensor:
        """[num_samples] float32: each sample's reward, from one forward over the micro-batch."""
        self.forward(**micro.model_inputs(self.dtype, self.attention))
        scores, self._scores = self._scores, None
        ends = sample_ends(micro.sample_ids.to(scores.device), micro.input_ids, self.pad_id, micro.num_samples)
        return scores.reshape(-1)[ends].float()

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = self.rewards(micro)
        chosen = rewards[micro.extras["chosen"].to(rewards.device)]  # [pairs]
        rejected = rewards[micro.extras["rejected"].to(rewards.device)]
        margins = torch.nan_to_num(micro.extras["margins"], nan=0.0)  # a pair without a margin has margin 0
        losses = reward_loss(chosen, rejected, margins, self.center_rewards_coefficient)
        return losses.sum() / max(step["pairs"], 1), reward_model_metrics(chosen, rejected, step["pairs"])


METHOD = RewardModel
