"""Eval: the held-out split of a dataset (`--split_dataset_ratio`) or a separate prepared
dataset (`--val_dataset`), and the eval loss, normalised by trained tokens like the training
loss (sum of token losses over every eval row / their trained tokens).

The split is by row identity (libs.dataset.split): row k of the dataset is held out when
ceil((k + 1) r) > ceil(k r), exactly ceil(n r) of n rows, evenly spread, the first always
among them, whatever order, epoch or rank reads it. dataprep applies it before dealing rows
to the ranks, so each rank's train rows follow from the manifest's row count."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from libs.dataset.schema import IGNORE_INDEX
from libs.dataset.split import Holdout
from services.trainer import data, devices


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off for the eval pass, training mode back after. bitsandbytes' 4-bit layers
    stay in training mode (they have no dropout): in eval mode on a CPU with AVX512-BF16 they
    repack their weights in place into a CPU-only layout, which fails for shapes that are not
    multiples of 32 and would leave the training weights changed. FSDP2's root gives back
    the parameters it gathered for the pass (it keeps them for a backward that never comes)."""
    from services.trainer import distributed

    model.eval()
    try:
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.train()
        yield
    finally:
        distributed.reshard(model)
        model.train()


@dataclass
class EvalResult:
    """One eval pass over every rank's eval rows."""

    loss: float  # the method's loss over all of them (SFT: summed token losses / trained tokens)
    trained_tokens: int  # labelled tokens evaluated
    rows: int
    metrics: dict[str, float]  # the method's, over all of them


def evaluate(method, source: data.RowSource, micro_batch_size: int, pad_id: int, world=None,
             device=None) -> EvalResult:
    """One pass over this rank's eval rows without gradients, every rank's results summed;
    the caller puts the model in eval mode and back. The method's loss of the whole pass is
    normalised by its counts over all eval rows, as a training step's over its rows.

    Distributed (`world`), every rank runs as many micro-batches as the rank with the most: a
    forward of FSDP2, ZeRO-3 or DDP is itself a collective (parameter all-gathers, buffer
    broadcasts), and a rank whose slice is a row shorter would otherwise leave the others
    waiting. Its extra micro-batches go through the method's whole loss (a method with a
    reference runs two forwards) on a real micro-batch, its own first or, when it has no
    rows, one of another rank's, and count for nothing. `device`: where the micro-batches go
    (the engine's; counts are taken on the host first)."""
    from services.trainer import distributed

    rows = [row for row, _ in source.epoch_rows(data.DataCursor())]
    micro_batches = [method.collate(rows[i:i + micro_batch_size], pad_id)
                     for i in range(0, len(rows), micro_batch_size)]
    distributed_run = world is not None and world.distributed
    totals: dict[str, int] = {}
    for micro in micro_batches:
        for name, value in method.counts(micro).items():
            totals[name] = totals.get(name, 0) + value
    # every rank evaluates its own slice; counts, then results, are summed over all of them
    agreed, filler = len(micro_batches), replace(micro_batches[0], filler=True) if micro_batches else None
    if distributed_run:
        shares = distributed.gather((len(micro_batches), totals, rows[0] if rows else None), world)
        agreed = max(count for count, _, _ in shares)
        totals = {}
        for _, share, _ in shares:
            for name, value in share.items():
                totals[name] = totals.get(name, 0) + value
        if filler is None and agreed:
            filler = replace(method.collate([next(row for _, _, row in shares if row is not None)], pad_id),
                             filler=True)
    loss, metrics = 0.0, dict.fromkeys(method.metrics, 0.0)  # every rank sums the same names
    trained = sum(micro.trained_tokens for micro in micro_batches)
    with torch.no_grad():
        for index in range(agreed):
            if index >= len(micro_batches):  # weight zero: only keeps this rank in step with the others
                method.loss(filler.to(device) if device is not None else filler, totals)
                continue
            micro = micro_batches[index]
            value, logged = method.loss(micro.to(device) if device is not None else micro, totals)
            loss += float(value)
            for name, metric in logged.items():
                metrics[name] += float(metric)
    metric_names = sorted(metrics)
    if distributed_run:
        summed = distributed.all_sum([loss, trained, len(rows), *(metrics[n] for n in metric_names)], world)
        loss, trained, count = summed[0], int(summed[1]), int(summed[2])
        metrics = dict(zip(metric_names, summed[3:]))
    else:
        count = len(rows)
    return EvalResult(loss, trained, count, metrics)


def sources(config, rank: int = 0, world_size: int = 1) -> tuple[data.DataprepRows, data.DataprepRows | None]:
    """(train rows, eval rows or None) of one rank for a job: the dataset, each epoch in its own
    order unless --dataset_shuffle false, less its held-out rows (--split_dataset_ratio); the
    held-out rows or the val_dataset, in file order, read the same way (same rank slice, same
    dataprep service)."""
    train = data.DataprepRows(config.dataprep_address, config.dataset, rank, world_size,
                              shuffle=config.dataset_shuffle, seed=config.seed)
    if config.val_dataset:
        return train, data.DataprepRows(config.dataprep_address, config.val_dataset, rank, world_size)
    if config.split_dataset_ratio > 0:
        ratio = config.split_dataset_ratio
        return (replace(train, holdout=Holdout(ratio, held_out=False)),
                data.DataprepRows(config.dataprep_address, config.dataset, rank, world_size,
                                  holdout=Holdout(ratio, held_out=True)))
    return train, None


def answers(row: data.Row) -> Iterator[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each sample of a row (a packed row holds several): the
    answer is the sample's last trained span (labels are input ids where trained, unshifted),
    the prompt everything before it, earlier turns' answers included. A sample with nothing
    before its answer (pt: every token trained) has no prompt and is left out."""
    start = 0
    for length in row.samples:
        ids, labels = row.input_ids[start:start + length], row.labels[start:start + length]
        start += length
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if len(trained) == 0:
            continue
        end = begin = int(trained[-1])
        while begin > 0 and labels[begin - 1] != IGNORE_INDEX:
            begin -= 1
        if begin == 0:
            continue
        yield ids[:begin].tolist(), ids[begin:end + 1].tolist()


def generate_nlg(policy, source: data.RowSource, tokenizer, config, world=None,
                 device=None) -> tuple[dict[str, float], int]:
    """--predict_with_generate: ms-swift's nlg scores (libs.common.nlg, keys eval_rouge-1 ...)
    of greedy answers to every rank's eval rows, and how many rows were scored. Each rank
    generates its own rows with its whole model (`policy`, unwrapped: DDP or ZeRO-2, where no
    forward is a collective), then the (answer, reference) texts of all ranks are gathered and
    scored alike on every rank. Greedy and alone per prompt (no padding): a row's answer does
    not depend on which rows share its rank."""
    from transformers import GenerationConfig

    from libs.common import nlg
    from services.trainer import distributed
    from services.trainer.methods.grpo import stop_tokens  # the EOS set online methods generate to

    stop = list(stop_tokens(tokenizer, policy))
    greedy = GenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=stop,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0])
    device = device if device is not None else next(policy.parameters()).device
    pairs = []
    with torch.no_grad(), devices.autocast(config, device):
        for row, _ in source.epoch_rows(data.DataCursor()):
            for prompt, answer in answers(row):
                ids = torch.tensor([prompt], dtype=torch.long, device=device)
                out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
                # stripped: the trained span ends with the template's text after its end-of-turn
                # token ("\n"), which BLEU over characters would count; ms-swift scores the bare answer
                pairs.append((tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip(),
                              tokenizer.decode(answer, skip_special_tokens=True).strip()))
    if world is not None and world.distributed:
        pairs = [pair for share in distributed.gather(pairs, world) for pair in share]
    scores, scored = nlg.nlg_scores([p for p, _ in pairs], [r for _, r in pairs])
    return {f"eval_{key}": value for key, value in scores.items()}, scored
