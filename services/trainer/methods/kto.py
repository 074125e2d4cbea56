"""KTO (--rlhf_type kto): rows labelled desirable or undesirable, each scored by the log-ratio
of the policy to the reference on its completion, against a KL baseline estimated from
mismatched sequences of the same micro-batch (services.trainer.losses.kto).

A row's prompt is its tokens before the first trained label, its completion the rest (the
trained tokens are what its log-prob sums). collate() adds to the micro-batch, after its n
rows, n mismatched sequences as TRL builds them: row i's prompt with row i-1's completion
(row 0 with the last row's). One policy forward and one reference forward over the whole
micro-batch give both the rows' and the mismatched sequences' log-probs.

Normalisation: each row's loss and metric is divided by the step's totals (rows, desirable
rows, undesirable rows over every micro-batch and rank), so the step's loss is the mean
over its rows whatever the accumulation split. The KL estimate is per micro-batch, pooled
over the ranks' micro-batches of the same index while training (TRL: each rank's micro-batch
mean, averaged over the ranks; equal when micro-batches are equal); in eval, each micro-batch's
own."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from libs.common.errors import InvalidArgument
from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data, modeling, packing
from services.trainer.config import METHOD_KINDS
from services.trainer.logprobs import sequence_logps
from services.trainer.losses.kto import kto_kl, kto_loss
from services.trainer.reference import Reference


def completion_start(row: data.Row) -> int:
    """Where the row's completion begins: its first trained label (the row's length if none)."""
    trained = np.flatnonzero(row.labels != IGNORE_INDEX)
    return int(trained[0]) if trained.size else len(row.labels)


def mismatched(rows: list[data.Row]) -> list[data.Row]:
    """Row i's prompt with row i-1's completion and its labels (row 0 with the last row's):
    TRL's KL sequences, completions rotated by one within the batch."""
    starts = [completion_start(row) for row in rows]
    out = []
    for i, row in enumerate(rows):
        other, start = rows[i - 1], starts[i - 1]
        prompt = starts[i]
        out.append(data.Row(np.concatenate([row.input_ids[:prompt], other.input_ids[start:]]),
                            np.concatenate([np.full(prompt, IGNORE_INDEX, dtype=row.labels.dtype),
                                            other.labels[start:]])))
    return out


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums over the data-parallel ranks (in place; the values themselves in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class Kto:
    name: ClassVar[str] = "kto"
    kinds, needs = METHOD_KINDS["kto"]
    metrics: ClassVar[tuple[str, ...]] = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                          "logps/chosen", "logps/rejected")
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        from libs.default_model.resolve import resolve_model

        self.forward = forward
        self.model = model
        self.dtype, self.attention = model.dtype, packing.attention_path(model)
        self.args = config.kto
        self.loss_type = self.args.loss_type[0]
        self.estimates_kl = self.loss_type == "kto"  # apo_zero_unpaired has no KL term
        # the reference is the starting weights (config.model), also when resuming a full checkpoint
        self.reference = Reference(config, forward, model, resolve_model(config.model).resolve())

    def collate(self, rows: list[data.Row], pad_id: int) -> data.MicroBatch:
        """The rows, then (loss_type kto, two rows or more) their mismatched sequences; extras
        `desirable` ([rows] bool) and `logp_labels` ([samples, seq]: the labels every
        sample's log-prob sums). `labels` and `tokens` count the rows alone: the mismatched
        sequences are forwarded but not trained."""
        for row in rows:
            if row.label is None:  # dataset_check refuses other kinds at submission: a reader's bug, said plainly
                raise InvalidArgument("rlhf_type kto trains on rows with a true/false `label` (task kto); dataset row "
                                      f"{row.key} has none", field="dataset")
        sequences = list(rows) + (mismatched(rows) if self.estimates_kl and len(rows) > 1 else [])
        micro = data.collate(sequences, pad_id)
        count = len(rows)
        trained = micro.labels.clone()
        trained[count:] = IGNORE_INDEX
        micro.extras.update(logp_labels=micro.labels, desirable=torch.tensor([bool(row.label) for row in rows]))
        micro.labels = trained
        micro.tokens = sum(len(row.input_ids) for row in rows)
        return micro

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        desirable = int(micro.extras["desirable"].sum())
        return {"rows": int(micro.extras["desirable"].numel()), "desirable": desirable,
                "undesirable": int(micro.extras["desirable"].numel()) - desirable}

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = micro.model_inputs(self.dtype, self.attention)
        logits = self.forward(**inputs).logits  # [samples, seq, vocab]: rows, then mismatched sequences
        ref_logits = self.reference.forward(**inputs).logits
        labels, samples = micro.extras["logp_labels"].to(logits.device), micro.sample_ids.to(logits.device)
        logps, _ = sequence_logps(logits, labels, samples, micro.num_samples)  # [samples]
        ref_logps, _ = sequence_logps(ref_logits.to(logits.device), labels, samples, micro.num_samples)
        desirable = micro.extras["desirable"].to(logps.device)
        rows = desirable.numel()
        if self.estimates_kl:
            # Training: every rank's micro-batch of this index takes part (one with no mismatched sequence
            # too), as the ranks step together. Eval: ranks may hold different numbers of eval
            # micro-batches, so each micro-batch's own estimate (a collective here would meet another).
            # a filler micro-batch (weight zero) joins the sum with no sequence: it must not move the others' KL
            kept = rows if micro.filler else logps.numel()
            kl = kto_kl(logps[rows:kept], ref_logps[rows:kept], all_sum if self.model.training else None)
        else:
            kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
        losses, rewards = kto_loss(logps[:rows], ref_logps[:rows], desirable, kl, self.args.beta, self.loss_type,
                                   self.args.desirable_weight, self.args.undesirable_weight)
        loss = losses.nansum() / max(step["rows"], 1)
        chosen, rejected = max(step["desirable"], 1), max(step["undesirable"], 1)
        policy = logps[:rows].detach()
        metrics = {
            "kl": kl * rows / max(step["rows"], 1),  # the step's value: the micro-batches' KL weighted by rows
            "rewards/chosen": rewards[desirable].nansum() / chosen,
            "rewards/rejected": rewards[~desirable].nansum() / rejected,
            "logps/chosen": policy[desirable].nansum() / chosen,
            "logps/rejected": policy[~desirable].nansum() / rejected,
        }
        both = step["desirable"] > 0 and step["undesirable"] > 0  # TRL logs a margin only then
        metrics["rewards/margins"] = (metrics["rewards/chosen"] - metrics["rewards/rejected"]) * both
        return loss, metrics


METHOD = Kto
