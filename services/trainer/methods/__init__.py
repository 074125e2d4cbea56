"""Training methods: the seam between the engine (data stream, back ends, optimizer,
checkpoints, resume, metrics; services.trainer.training) and what a method does.

A method is one module here. It says which dataset kinds it trains on (the manifest's
`task`), builds the model it trains, makes micro-batches of shard rows, and computes the
loss of a micro-batch with the metrics it logs. The loss is normalised by totals over the
whole optimizer step (`counts`, summed over micro-batches and ranks by the engine), so how
rows are split into micro-batches or ranks does not change the update.

A method may also have `prepare(rows, eval_rows, world, pad_id) -> (rows, eval_rows)`, which
the engine calls once before training: a pass over the data of its own (dpo's precomputed
reference log-probs), returning the row sources to train and evaluate on.
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Protocol

import torch

from services.trainer.data import MicroBatch

# --rlhf_type -> its module here; unset trains supervised (sft, and pt: the same loss on other data)
MODULES = {None: "sft", "dpo": "dpo", "kto": "kto", "orpo": "orpo", "cpo": "cpo", "simpo": "simpo", "rm": "rm"}


class Method(Protocol):
    """What the engine asks of a training method. The class builds the model; an instance is
    made once the model and its back end exist: Method(config, forward, model, tokenizer),
    where `forward` runs the policy through the back end."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # dataset kinds (the manifest's task) it trains on
    needs: ClassVar[str]  # what such a dataset holds, for the error naming a wrong one
    metrics: ClassVar[tuple[str, ...]]  # the names `loss` logs beside the loss (TRL's), every call

    @staticmethod
    def build_model(config, model_dir) -> torch.nn.Module:
        """The model to train (the policy), loaded from `model_dir`."""

    def collate(self, rows: list, pad_id: int) -> MicroBatch:
        """A micro-batch of shard rows (data.Row / data.PairRow)."""

    def counts(self, micro: MicroBatch) -> dict[str, int]:
        """This micro-batch's share of the step's normalisers (e.g. trained tokens, pairs)."""

    def loss(self, micro: MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and logged metrics, each already divided by the step's
        totals (`step`: counts summed over the step's micro-batches and every rank), so the
        engine sums them over micro-batches and ranks to get the step's values."""


def get(rlhf_type: str | None) -> type[Method]:
    """The Method class of --rlhf_type (None: supervised training)."""
    return importlib.import_module(f"services.trainer.methods.{MODULES[rlhf_type]}").METHOD
