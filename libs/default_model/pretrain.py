"""The default model's short pre-training: packed next-token prediction over the shipped corpus with AdamW."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import torch
from tqdm import tqdm

from libs.default_model.config import BuildConfig


def lr_at(step: int, config: BuildConfig) -> float:
    """Linear warm-up to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate` at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batches(documents: list[list[int]], config: BuildConfig) -> Iterator[torch.Tensor]:
    """Endless [batch, max_length] blocks cut from the documents concatenated end to end, in a
    fresh seeded order on every pass. Samples are not isolated from their neighbours: this is
    plain language-model pre-training, where each document ends with <|endoftext|>."""
    generator = torch.Generator().manual_seed(config.seed)
    block = config.per_device_train_batch_size * config.max_length
    pending: list[int] = []
    while True:
        for index in torch.randperm(len(documents), generator=generator).tolist():
            pending += documents[index]
            while len(pending) >= block:
                chunk, pending = pending[:block], pending[block:]
                yield torch.tensor(chunk, dtype=torch.long).view(config.per_device_train_batch_size, config.max_length)


def pretrain(model: torch.nn.Module, documents: list[list[int]], config: BuildConfig) -> list[float]:
    """Trains `model` in place for `config.max_steps` steps; returns the loss of every step."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms are not weight-decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    model.train()
    losses = []
    stream = batches(documents, config)
    # mininterval: the bar also lands in service logs when the build runs inside a service.
    progress = tqdm(range(config.max_steps), desc="pre-training the default model", unit="step", file=sys.stderr, mininterval=1.0)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        input_ids = next(stream)  # [batch, max_length]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
