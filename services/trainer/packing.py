"""Packed rows (several samples concatenated, see docs/dataset-format.md): how their samples
are kept apart in attention, which depends on the model's attention implementation, their
restarting position ids, and the labels with the causal shift cut at every sample boundary.

The paths (`attention_path`; docs/training.md measures them):
- varlen (flash_attention_2/3/4): no mask; cumulative sequence lengths of every row's blocks
  (`cu_seq_lens_q/k`, `max_length_q/k`), which transformers hands to flash-attn's varlen kernel.
  Position ids alone would not do: transformers reads packing from them only for batch size 1.
  They go too, with `use_cache=False`: a model that is not flash (a reference loaded without
  the policy's implementation) ignores the lengths and builds its packed mask from them.
- block_mask (flex_attention): no mask; restarting position ids with `use_cache=False`, from
  which transformers builds a FlexAttention BlockMask (memory ~ (L/128)^2, not L^2).
- dense (sdpa, eager, anything else): the 4-D additive block-diagonal causal mask, built in the
  model's dtype on the inputs' device when the forward's inputs are made, once per forward.
  torch's sdpa on CPU takes only a dense mask; a boolean one is converted to float by every
  layer and kept for backward (more memory, measured), so the float mask is built once.
- prebuilt (TUNEFORGE_PACKING_MASK=prebuilt): the dense float32 mask built when rows are
  collated and held by the micro-batch, as before; kept to compare against.

Restarted position_ids alone with the model's default cache on do not isolate samples with
eager or sdpa (transformers 5.19 builds the packed mask only without a cache; the loss was
~1.0 off). Padding after the samples of a row forms one more block, so no attention row is
all -inf (no NaN)."""

from __future__ import annotations

import itertools
import os

import torch

from libs.dataset.schema import IGNORE_INDEX


def blocks(seq_lens: list[int], length: int) -> list[int]:
    """The row's blocks: its samples, then the padding up to `length` as one more block."""
    used = sum(seq_lens)
    if used > length:
        raise ValueError(f"seq_lens sum to {used}, more than the row's {length} tokens")
    return [n for n in seq_lens if n > 0] + ([length - used] if used < length else [])


def block_causal_mask(rows_seq_lens: list[list[int]], length: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, 1, length, length] additive mask: 0 where query t may attend key k (same
    block, k <= t), the dtype's most negative value elsewhere. Built in place: the mask and
    one [length, length] causal template, no boolean or float temporaries of the mask's size."""
    low = torch.finfo(dtype).min
    mask = torch.full((len(rows_seq_lens), 1, length, length), low, dtype=dtype, device=device)
    causal = torch.full((length, length), low, dtype=dtype, device=device).triu_(1)  # 0 on and below the diagonal
    for i, seq_lens in enumerate(rows_seq_lens):
        start = 0
        for n in blocks(seq_lens, length):
            mask[i, 0, start:start + n, start:start + n] = causal[:n, :n]
            start += n
    return mask


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


# The value of TUNEFORGE_PACKING_MASK that brings back the mask built at collation (benchmarks).
PREBUILT = "prebuilt"
VARLEN = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4"})


def prebuilt() -> bool:
    """Whether collation builds the dense mask (TUNEFORGE_PACKING_MASK=prebuilt), as before."""
    return os.environ.get("TUNEFORGE_PACKING_MASK", "") == PREBUILT


def attention_path(model) -> str:
    """How packed rows reach `model`'s attention: "varlen", "block_mask" or "dense" (see the
    module's opening), read from the attention implementation the model was loaded with
    (`config._attn_implementation`; through PEFT, DDP or FSDP2 the wrapped model's)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation in VARLEN:
        return "varlen"
    if implementation == "flex_attention":
        return "block_mask"
    return "dense"


def varlen_kwargs(rows_seq_lens: list[list[int]], length: int, device: torch.device | str = "cpu") -> dict:
    """flash-attn's varlen arguments for rows of `length` tokens, read as one flat sequence:
    every row's blocks (its samples, then its padding) in order."""
    lengths = [n for seq_lens in rows_seq_lens for n in blocks(seq_lens, length)]
    cumulative = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative,
            "max_length_q": max(lengths), "max_length_k": max(lengths)}
