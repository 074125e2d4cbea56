"""The one-slot fast path of vLLM's CPU LoRA ops (libs.common.vllm_cpu_lora) against vLLM's own
torch ops on the same tensors: every token on one slot (the fast path), tokens on several slots
and on no adapter (-1; vLLM's ops), prefill (sgmv) and decode (bgmv) forms, each with and
without add_inputs; and that the engine's punica wrapper calls them once installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.ops import torch_ops  # noqa: E402

from libs.common import vllm_cpu_lora  # noqa: E402

SLOTS, RANK, IN, OUT, TOKENS = 3, 8, 32, 48, 7
FAST = vllm_cpu_lora._fast_ops(torch_ops)


def tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=generator)  # vLLM's stacked lora_a: [slots, 1, rank, in]
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=generator)  # lora_b: [slots, 1, out, rank]
    x = torch.randn(TOKENS, IN, generator=generator)
    h = torch.randn(TOKENS, RANK, generator=generator)
    y = torch.randn(TOKENS, OUT + 16, generator=generator)  # wider: the slice forms write part of it
    return a, b, x, h, y


# token -> slot: one slot (fast), mixed slots, no adapter beside one (-1 indexes the last slot, as vLLM's ops do)
INDICES = {"one slot": [1] * TOKENS, "slot 0": [0] * TOKENS, "mixed": [0, 0, 2, 2, 2, 1, 1],
           "with base": [-1, -1, 1, 1, 1, 1, 1], "base only": [-1] * TOKENS}


@pytest.mark.parametrize("case", list(INDICES))
@pytest.mark.parametrize("add_inputs", [True, False])
def test_bgmv_forms_equal_vllms_ops(case, add_inputs):
    a, b, x, h, y = tensors(0)
    indices = torch.tensor(INDICES[case])
    for name, args in (("bgmv_expand", (h, b)), ("bgmv_expand_slice", (h, b))):
        extra = (8, OUT) if name.endswith("slice") else ()
        want, got = y.clone(), y.clone()
        getattr(torch_ops, name)(*args, want, indices, *extra, add_inputs)
        FAST[name](*args, got, indices, *extra, add_inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if case != "base only":  # (serving's lora_mask, when loaded, leaves rows without a LoRA alone)
            assert not torch.equal(got, y)
    want, got = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    torch_ops.bgmv_shrink(x, a, want, indices, 0.5)
    FAST["bgmv_shrink"](x, a, got, indices, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(INDICES))
def test_sgmv_forms_equal_vllms_ops(case):
    from vllm.lora.punica_wrapper.utils import compute_meta

    a, b, x, h, y = tensors(1)
    # the prefill metadata vLLM computes from the tokens' slots (consecutive runs merged)
    meta = compute_meta(torch.tensor(INDICES[case]))[:-1]
    want, got = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    torch_ops.sgmv_shrink(x, a, want, *meta, 2.0)
    FAST["sgmv_shrink"](x, a, got, *meta, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for add_inputs in (True, False):
        want, got = y[:, :OUT].clone(), y[:, :OUT].clone()
        torch_ops.sgmv_expand(h, b, want, *meta, add_inputs)
        FAST["sgmv_expand"](h, b, got, *meta, add_inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want, got = y.clone(), y.clone()
        torch_ops.sgmv_expand_slice(h, b, want, *meta, 16, OUT, add_inputs)
        FAST["sgmv_expand_slice"](h, b, got, *meta, 16, OUT, add_inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_slot_is_the_fast_path_and_no_lora_never_is():
    assert vllm_cpu_lora._one_slot(torch.tensor(INDICES["one slot"])) == 1
    assert vllm_cpu_lora._one_slot(torch.tensor(INDICES["slot 0"])) == 0
    for case in ("mixed", "with base", "base only"):
        assert vllm_cpu_lora._one_slot(torch.tensor(INDICES[case])) is None
    assert vllm_cpu_lora._one_slot(torch.tensor([], dtype=torch.long)) is None


def test_install_points_the_cpu_punica_wrappers_sgmv_ops_at_the_fast_paths():
    from vllm.lora.punica_wrapper import punica_cpu

    vllm_cpu_lora.install()
    vllm_cpu_lora.install()  # once per process: the fallbacks stay the ops torch_ops binds
    for name in vllm_cpu_lora.SGMV:
        assert getattr(punica_cpu, name).__module__ == vllm_cpu_lora.__name__
    # the bgmv names are left to vLLM (and to serving's lora_mask, which wraps them)
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        assert getattr(punica_cpu, name).__module__ != vllm_cpu_lora.__name__


@pytest.mark.parametrize("token_ids", [[2] * 5, [1, 1, 2, 2, 2]], ids=["one adapter", "two adapters"])
def test_vllms_punica_wrapper_with_the_fast_path_applies_each_rows_adapter(token_ids):
    """Through vLLM's CPU punica wrapper as v1's model runner drives it (is_prefill, the sgmv
    forms), installed: each row gets x @ A.T @ B.T * scale of its own slot, slice by slice."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    vllm_cpu_lora.install()
    slices, slot_of_id = (6, 5), [1, 2]  # slot i holds the LoRA with int id i + 1
    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=16, device="cpu")
    punica.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids), is_prefill=True), slot_of_id, 2,
                           vocab_size=100)
    generator = torch.Generator().manual_seed(3)
    lora_a = tuple(torch.randn(2, 1, RANK, IN, generator=generator) for _ in slices)
    lora_b = tuple(torch.randn(2, 1, size, RANK, generator=generator) for size in slices)
    x = torch.randn(len(token_ids), IN, generator=generator)
    y = torch.randn(len(token_ids), sum(slices), generator=generator)
    want = y.clone()
    for row, lora_id in enumerate(token_ids):
        slot, offset = slot_of_id.index(lora_id), 0
        for a, b, size in zip(lora_a, lora_b, slices):
            want[row, offset:offset + size] += (x[row] @ a[slot, 0].T * 0.5) @ b[slot, 0].T
            offset += size
    punica.add_lora_linear(y, x, lora_a, lora_b, 0.5, slices)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
