"""Direct preference optimisation (--rlhf_type dpo): the policy's and the reference's summed
log-probs of each pair's chosen and rejected answers, any mix of TRL's loss types
(services.trainer.losses.dpo), normalised per pair of the whole step (`sft` and the rpo term per
chosen token of the step). The reference runs beside the policy on every micro-batch, or once
before training with --precompute_ref_log_probs (services.trainer.precompute)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from services.trainer import data, distributed, modeling, packing, pairs, precompute
from services.trainer.config import METHOD_KINDS
from services.trainer.logprobs import sequence_logps
from services.trainer.losses.dpo import Pairs, Params, mixed_loss
from services.trainer.reference import Reference


class Dpo:
    name: ClassVar[str] = "dpo"
    kinds, needs = METHOD_KINDS["dpo"]
    metrics: ClassVar[tuple[str, ...]] = pairs.REWARD_METRICS
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        from libs.default_model.resolve import resolve_model

        self.config, self.args = config, config.dpo
        self.forward, self.model, self.dtype = forward, model, model.dtype
        self.attention = packing.attention_path(model)
        self.params = Params(self.args.beta, self.args.label_smoothing, self.args.discopop_tau)
        self.model_dir = resolve_model(config.model).resolve()
        # precomputed: loaded only if the run directory lacks the values, and freed once they exist
        self.reference = None if config.precompute_ref_log_probs else self._load_reference()

    def _load_reference(self) -> Reference:
        return Reference(self.config, self.forward, self.model, self.model_dir)

    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        # unpacked pairs packed into the micro-batch's rows: less padding, the same log-probs
        return pairs.collate(rows, pad_id, padding_free=True)

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"pairs": pairs.count(micro), "chosen_tokens": pairs.chosen_tokens(micro)}

    def reference_logps(self, micro: data.MicroBatch) -> torch.Tensor:
        """[num_samples] the reference's summed log-prob of each sample's labelled tokens."""
        if "ref_logps" in micro.extras:
            return micro.extras["ref_logps"]
        with torch.no_grad():
            logits = self.reference.forward(**micro.model_inputs(self.dtype, self.attention)).logits  # [b, s, vocab]
            # the precompute pass hands host micro-batches: the labels go where the logits are
            return sequence_logps(logits, micro.labels.to(logits.device), micro.sample_ids.to(logits.device),
                                  micro.num_samples)[0]

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the reference first: its logits are gone before the policy's (kept for backward) exist
        reference = self.reference_logps(micro)
        policy = pairs.pair_logps(self.forward(**micro.model_inputs(self.dtype, self.attention)).logits, micro)
        reference = reference.to(policy.chosen.device, policy.chosen.dtype)
        x = Pairs(policy.chosen, policy.rejected, reference[micro.extras["chosen"]],
                  reference[micro.extras["rejected"]], policy.chosen_tokens, policy.rejected_tokens)
        loss = mixed_loss(x, self.params, self.args.loss_type, self.args.loss_weights, self.args.rpo_alpha,
                          step["pairs"], step["chosen_tokens"])
        # TRL's: the rewards are beta x the log-ratios, whatever the loss type
        metrics = pairs.reward_metrics(self.args.beta * x.chosen_logratios, self.args.beta * x.rejected_logratios,
                                       x.chosen_logps, x.rejected_logps, step["pairs"])
        return loss, metrics

    def prepare(self, rows: data.RowSource, eval_rows: data.RowSource | None, world: distributed.World,
                pad_id: int) -> tuple[data.RowSource, data.RowSource | None]:
        """Before training: with --precompute_ref_log_probs, the sources' rows with their
        reference log-probs (read from the run directory, or computed now), the reference freed."""
        if not self.config.precompute_ref_log_probs:
            return rows, eval_rows

        def table(source: data.RowSource) -> dict[int, np.ndarray]:
            if self.reference is None:
                self.reference = self._load_reference()
            filler = data.Row(np.array([pad_id], dtype=np.int32), np.array([data.IGNORE_INDEX], dtype=np.int32))
            return precompute.compute(
                source, lambda group: self.collate(group, pad_id), self.config.per_device_train_batch_size,
                self.reference_logps, lambda group: pairs.row_samples(group, padding_free=True), world,
                lambda: self.reference.forward(**data.collate([filler], pad_id).model_inputs(self.dtype)))

        rows = precompute.annotate(rows, "train", self.config.output_dir, self._fingerprint(self.config.dataset),
                                   world, table)
        if eval_rows is not None:
            eval_rows = precompute.annotate(eval_rows, "eval", self.config.output_dir,
                                            self._fingerprint(self.config.val_dataset or self.config.dataset),
                                            world, table)
        self.reference = None  # training never runs it: a loaded copy is freed here
        return rows, eval_rows

    def _fingerprint(self, dataset: str) -> str:
        config = self.config
        return precompute.fingerprint({
            "method": self.name, "dataset": dataset, "model": str(self.model_dir), "ref_model": config.ref_model,
            "ref_adapters": list(config.ref_adapters), "torch_dtype": config.torch_dtype,
            "train_type": config.train_type, "quant_bits": config.quant_bits})


METHOD = Dpo
