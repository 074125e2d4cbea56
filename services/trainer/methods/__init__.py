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

An online method (grpo, ppo, gkd: ClassVar `online = True`) trains on what it generates. Its
data are prompt rows (data.PromptRow); the engine reads `prompts_per_rollout()` of them per
rollout on each rank and hands them to `rollout(prompts, step)`, which generates, scores and
returns a `Rollout`: the micro-batches of `updates_per_rollout()` optimizer steps, which the
engine then trains one after the other through `counts` and `loss` as for any method.
Checkpoints and cancellation happen between rollouts only, so nothing of a rollout is saved.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from services.trainer.data import MicroBatch, PromptRow

# --rlhf_type -> its module here; unset trains supervised (sft, and pt: the same loss on other data)
MODULES = {None: "sft", "dpo": "dpo", "kto": "kto", "orpo": "orpo", "cpo": "cpo", "simpo": "simpo", "rm": "rm",
           "grpo": "grpo", "ppo": "ppo", "gkd": "gkd"}


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


@dataclass
class Rollout:
    """What one rollout of an online method feeds the engine."""

    updates: list[list[MicroBatch]]  # the micro-batches of each optimizer step it feeds, in order
    # where its time went, in seconds: generation, reward, reference, old_logps, sync, ... (the engine
    # adds train); this rank's
    seconds: dict[str, float] = field(default_factory=dict)
    # its metrics (reward, reward_std, completions/mean_length, ...) over every rank's completions: the
    # same on every rank (the method gathers what it needs); logged with each step it feeds
    logged: dict[str, float] = field(default_factory=dict)


class OnlineMethod(Method, Protocol):
    """A method that generates its own training data from prompt rows."""

    online: ClassVar[bool]  # True

    def prompts_per_rollout(self) -> int:
        """Prompt rows this rank reads per rollout."""

    def updates_per_rollout(self) -> int:
        """Optimizer steps each rollout feeds (len(Rollout.updates)): the engine's step count."""

    def rollout(self, prompts: list[PromptRow], step: int) -> Rollout:
        """Generates, scores and batches the completions of `prompts`; `step`: the optimizer
        steps taken before it (the generation seeds derive from it)."""

    def close(self) -> None:
        """Frees what the rollouts hold (a vLLM engine, a server connection)."""


def is_online(method) -> bool:
    return getattr(method, "online", False)


def get(rlhf_type: str | None) -> type[Method]:
    """The Method class of --rlhf_type (None: supervised training)."""
    return importlib.import_module(f"services.trainer.methods.{MODULES[rlhf_type]}").METHOD
