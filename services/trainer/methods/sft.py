"""Supervised training (sft, and pt, which differs only in its data): next-token cross-entropy
over the trained tokens, normalised by the trained tokens of the whole step."""

from __future__ import annotations

from typing import ClassVar

import torch

from services.trainer import data, modeling, packing
from services.trainer.config import METHOD_KINDS
from services.trainer.losses.sft import sft_loss, trained_tokens


class Sft:
    name: ClassVar[str] = "sft"
    kinds, needs = METHOD_KINDS[None]
    metrics: ClassVar[tuple[str, ...]] = ()
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        self.forward = forward
        self.dtype, self.attention = model.dtype, packing.attention_path(model)

    def collate(self, rows: list[data.Row], pad_id: int) -> data.MicroBatch:
        return data.collate(rows, pad_id)

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"trained_tokens": trained_tokens(micro.labels)}

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.forward(**micro.model_inputs(self.dtype, self.attention)).logits  # [b, s, vocab]
        return sft_loss(logits, micro.labels, step["trained_tokens"]), {}


METHOD = Sft
