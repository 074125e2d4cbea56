"""vLLM's CPU LoRA path (its punica wrapper over the PyTorch ops) with the patch of
services.serving.lora_mask: in a batch mixing rows without a LoRA (slot -1) and rows with
one, the rows without stay exactly the base layer's output and the others get exactly
their own adapter; a batch without LoRA rows never reaches the ops. Unpatched, vLLM
0.32 applies the last slot's adapter to the rows without (the canary below fails once
vLLM fixes that; then drop the patch)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.serving import lora_mask

SLOTS, RANK, IN = 3, 4, 8
SLICES = (6, 5)  # a fused layer's output slices (as q/k/v or gate/up)
SLOT_OF_ID = [1, 2, 3]  # vLLM's lora_index_to_id: slot i holds the LoRA with int id i + 1


def wrapper(token_ids: list[int], prompt_ids: list[int] | None = None):
    """vLLM's CPU punica wrapper for a batch whose tokens carry these LoRA int ids (0: none),
    as vLLM v1's model runner sets it (is_prefill always True on CPU)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=16, device="cpu")
    mapping = LoRAMapping(tuple(token_ids), tuple(prompt_ids if prompt_ids is not None else token_ids),
                          is_prefill=True)
    punica.update_metadata(mapping, SLOT_OF_ID, SLOTS, vocab_size=100)
    return punica


def weights(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lora_a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=generator) for _ in SLICES)  # [slots, 1, rank, in]
    lora_b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=generator) for size in SLICES)  # [slots, 1, out, rank]
    return lora_a, lora_b


def expected_linear(y, x, lora_a, lora_b, token_ids, scale):
    """y plus, on each row with a LoRA, x @ A.T @ B.T * scale of that row's slot, slice by slice."""
    out = y.clone()
    for row, lora_id in enumerate(token_ids):
        if lora_id == 0:
            continue
        slot, offset = SLOT_OF_ID.index(lora_id), 0
        for a, b, size in zip(lora_a, lora_b, SLICES):
            out[row, offset:offset + size] += (x[row] @ a[slot, 0].T * scale) @ b[slot, 0].T
            offset += size
    return out


def run_linear(token_ids: list[int], seed: int = 0):
    """(the base layer's output, it after vLLM's LoRA linear op, the per-row reference)."""
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(token_ids), IN, generator=generator)
    y = torch.randn(len(token_ids), sum(SLICES), generator=generator)  # the base layer's output
    lora_a, lora_b = weights(seed)
    before = y.clone()
    wrapper(token_ids).add_lora_linear(y, x, lora_a, lora_b, 0.5, SLICES)
    return before, y, lambda ids=token_ids: expected_linear(before, x, lora_a, lora_b, ids, 0.5)


def test_the_patch_is_installed_where_vllm_calls_the_ops():
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    assert lora_mask.installed()
    assert punica_cpu.bgmv_expand_slice is lora_ops.bgmv_expand_slice
    lora_mask.install()  # again: the same wrappers, not wrappers of wrappers
    assert not getattr(lora_ops.bgmv_shrink.__wrapped__, "tuneforge_masked", False)
    assert lora_mask.WorkerExtension().tuneforge_lora_rows_masked() is True


def test_mixed_batch_rows_without_a_lora_are_the_base_output_and_the_others_their_own_adapter():
    token_ids = [1, 1, 0, 0, 2, 0, 3, 3]  # a prompt of LoRA 1, a base prompt, ... as the scheduler lays them out
    before, after, expected = run_linear(token_ids)
    base_rows = [row for row, lora_id in enumerate(token_ids) if lora_id == 0]
    assert torch.equal(after[base_rows], before[base_rows])
    torch.testing.assert_close(after, expected())


def test_unpatched_vllm_gives_rows_without_a_lora_the_last_slots_adapter(monkeypatch):
    """The canary: when this fails, vLLM skips slot -1 itself and lora_mask can go."""
    from vllm.lora.ops.torch_ops import lora_ops

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        original = getattr(lora_ops, name).__wrapped__
        for module in lora_mask._MODULES:
            monkeypatch.setattr(f"{module}.{name}", original)
    before, after, expected = run_linear([1, 0, 2])
    assert not torch.equal(after[1], before[1])
    torch.testing.assert_close(after, expected([1, 3, 2]))  # the base row got the last slot's (LoRA id 3's)


def test_a_batch_without_lora_rows_never_reaches_the_ops(monkeypatch):
    """What vLLM's server pays for base-only traffic: the wrapper returns before any op."""
    from vllm.lora.ops.torch_ops import lora_ops

    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA op ran for a batch without LoRA rows")

    monkeypatch.setattr(lora_ops, "bgmv_shrink", refuse)
    monkeypatch.setattr(lora_ops, "bgmv_expand_slice", refuse)
    before, after, _ = run_linear([0, 0, 0, 0])
    assert torch.equal(after, before)


def test_embedding_rows_without_a_lora_get_nothing_added():
    """The embedding LoRA is expand-only (B of the row's slot on its looked-up A rows)."""
    token_ids = [2, 0, 0, 1]
    generator = torch.Generator().manual_seed(3)
    lora_b = torch.randn(SLOTS, 1, 7, RANK, generator=generator)  # [slots, 1, hidden, rank]
    x = torch.randn(len(token_ids), RANK, generator=generator)
    y = torch.randn(len(token_ids), 7, generator=generator)
    before = y.clone()
    wrapper(token_ids).add_lora_embedding(y, x, lora_b, add_inputs=True)
    assert torch.equal(y[[1, 2]], before[[1, 2]])
    torch.testing.assert_close(y[[0, 3]], before[[0, 3]] + torch.stack([x[0] @ lora_b[1, 0].T, x[3] @ lora_b[0, 0].T]))


def test_logits_rows_without_a_lora_get_nothing_added():
    """The lm_head LoRA runs the bgmv ops on the sampler's rows (one per request)."""
    prompt_ids = [3, 0, 1]
    generator = torch.Generator().manual_seed(4)
    lora_a = torch.randn(SLOTS, 1, RANK, IN, generator=generator)
    lora_b = torch.randn(SLOTS, 1, 11, RANK, generator=generator)  # [slots, 1, vocab, rank]
    x = torch.randn(3, IN, generator=generator)
    y = torch.randn(3, 11, generator=generator)
    before = y.clone()
    wrapper([3, 3, 0, 1], prompt_ids).add_lora_logits(y, x, lora_a, lora_b, 1.0)
    assert torch.equal(y[1], before[1])
    torch.testing.assert_close(y[[0, 2]], before[[0, 2]] + torch.stack(
        [x[0] @ lora_a[2, 0].T @ lora_b[2, 0].T, x[2] @ lora_a[0, 0].T @ lora_b[0, 0].T]))


@settings(max_examples=settings().max_examples // 4)
@given(st.lists(st.integers(0, SLOTS), min_size=1, max_size=24), st.integers(0, 3))
def test_any_mix_of_rows_matches_the_per_row_reference(token_ids, seed):
    before, after, expected = run_linear(token_ids, seed)
    base_rows = [row for row, lora_id in enumerate(token_ids) if lora_id == 0]
    assert torch.equal(after[base_rows], before[base_rows])
    torch.testing.assert_close(after, expected())


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_without_add_inputs_zeroes_rows_without_a_lora(add_inputs):
    """Triton's expand writes nothing on rows without a LoRA into a zeroed buffer; vLLM's dual-stream path
    calls expand with add_inputs=False on such a buffer: those rows must end zero, not the last slot's."""
    from vllm.lora.ops.torch_ops import lora_ops

    generator = torch.Generator().manual_seed(5)
    lora_b = torch.randn(SLOTS, 1, 6, RANK, generator=generator)
    x = torch.randn(3, RANK, generator=generator)
    y = torch.randn(3, 6, generator=generator)
    before = y.clone()
    lora_ops.bgmv_expand_slice(x, lora_b, y, torch.tensor([0, -1, 2]), 0, 6, add_inputs)
    assert torch.equal(y[1], before[1] if add_inputs else torch.zeros(6))
    mine = torch.stack([x[0] @ lora_b[0, 0].T, x[2] @ lora_b[2, 0].T])
    torch.testing.assert_close(y[[0, 2]], before[[0, 2]] + mine if add_inputs else mine)
