"""Packed rows (several samples concatenated, see docs/dataset-format.md): the 4-D additive
block-diagonal causal mask that keeps the samples apart, their restarting position ids, and
the labels with the causal shift cut at every sample boundary.

Restarted position_ids alone do not isolate samples with eager or sdpa attention (with
transformers 5.19 on CPU the packed loss was ~1.0 off); the mask does. Padding after the
samples of a row forms one more block, so no attention row is all -inf (no NaN)."""

from __future__ import annotations

import torch

from libs.dataset.schema import IGNORE_INDEX


def blocks(seq_lens: list[int], length: int) -> list[int]:
    """The row's blocks: its samples, then the padding up to `length` as one more block."""
    used = sum(seq_lens)
    if used > length:
        raise ValueError(f"seq_lens sum to {used}, more than the row's {length} tokens")
    return [n for n in seq_lens if n > 0] + ([length - used] if used < length else [])


def block_causal_mask(rows_seq_lens: list[list[int]], length: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[batch, 1, length, length] additive mask: 0 where query t may attend key k (same
    block, k <= t), the dtype's most negative value elsewhere."""
    allowed = torch.zeros((len(rows_seq_lens), 1, length, length), dtype=torch.bool)
    for i, seq_lens in enumerate(rows_seq_lens):
        start = 0
        for n in blocks(seq_lens, length):
            allowed[i, 0, start:start + n, start:start + n] = True
            start += n
    allowed &= torch.ones((length, length), dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def position_ids(rows_seq_lens: list[list[int]], length: int) -> torch.Tensor:
    """[batch, length] int64: 0, 1, ... restarting at every block."""
    out = torch.zeros((len(rows_seq_lens), length), dtype=torch.long)
    for i, seq_lens in enumerate(rows_seq_lens):
        start = 0
        for n in blocks(seq_lens, length):
            out[i, start:start + n] = torch.arange(n)
            start += n
    return out


def cut_labels(labels: torch.Tensor, rows_seq_lens: list[list[int]]) -> torch.Tensor:
    """labels [batch, length] with IGNORE_INDEX at the first token of every sample but the
    row's first: after the causal shift the last token of a sample then predicts nothing,
    exactly as when the samples are trained one by one."""
    labels = labels.clone()
    for i, seq_lens in enumerate(rows_seq_lens):
        start = 0
        for n in seq_lens[:-1]:
            start += n
            labels[i, start] = IGNORE_INDEX
    return labels
