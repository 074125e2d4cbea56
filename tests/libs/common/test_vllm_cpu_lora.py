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


# -- the merged path (merge_single): vLLM's LoRA linear layers, built for real on CPU -------------

HIDDEN, LORA_SLOTS = 32, 2


@pytest.fixture(scope="module")
def vllm_layers():
    """vLLM's config and a one-process tensor-parallel group, as its layers need to be built;
    torn down after unless the process had them before."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with set_current_vllm_config(VllmConfig()):
        owned = not parallel_state.model_parallel_is_initialized()
        if owned and torch.distributed.is_initialized():
            pytest.skip("a torch process group of another test is up without vLLM's groups: vLLM's layers cannot "
                        "be built beside it")
        if owned:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                        distributed_init_method=f"tcp://127.0.0.1:{port}")
            parallel_state.initialize_model_parallel(1, 1)
        vllm_cpu_lora.install()
        try:
            yield
        finally:
            vllm_cpu_lora.merge_single(False)
            if owned:
                parallel_state.destroy_model_parallel()
                parallel_state.destroy_distributed_environment()


def build_layer(kind: str, seed: int):
    """(vLLM LoRA layer, its base weight as loaded [out, in], bias or None): the base layer's
    weights processed as the engine does (on CPU: packed for its GEMM, the plain tensor dropped)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora import layers
    from vllm.model_executor.layers import linear

    bases = {
        "column": lambda: (linear.ColumnParallelLinear(HIDDEN, 48, bias=True), layers.ColumnParallelLinearWithLoRA),
        "merged column": lambda: (linear.MergedColumnParallelLinear(HIDDEN, [40, 24], bias=False),
                                  layers.MergedColumnParallelLinearWithLoRA),
        "qkv": lambda: (linear.QKVParallelLinear(HIDDEN, 8, 4, 2, bias=True), layers.MergedQKVParallelLinearWithLoRA),
        "row": lambda: (linear.RowParallelLinear(40, HIDDEN, bias=True), layers.RowParallelLinearWithLoRA),
    }
    generator = torch.Generator().manual_seed(seed)
    base, lora_cls = bases[kind]()
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=generator) * 0.1)
        if base.bias is not None:
            base.bias.copy_(torch.randn(base.bias.shape, generator=generator))
    weight = base.weight.detach().clone()
    bias = base.bias.detach().clone() if base.bias is not None else None
    base.quant_method.process_weights_after_loading(base)
    layer = lora_cls(base)
    config = LoRAConfig(max_lora_rank=RANK, max_loras=LORA_SLOTS)
    config.lora_dtype = torch.float32  # what the engine resolves "auto" to for a float32 model
    layer.create_lora_weights(LORA_SLOTS, config)
    return layer, weight, bias


def adapter(layer, seed: int):
    """Per slice A [rank, in] and B [out_i, rank] (the scaling folded in, as vLLM loads them)."""
    generator = torch.Generator().manual_seed(seed)
    a = [torch.randn(RANK, layer.input_size, generator=generator) * 0.2 for _ in layer.output_slices]
    b = [torch.randn(size, RANK, generator=generator) * 0.2 for size in layer.output_slices]
    return a, b


def load(layer, slot: int, a, b) -> None:
    if len(a) == 1 and type(layer).__name__ in ("ColumnParallelLinearWithLoRA", "RowParallelLinearWithLoRA"):
        layer.set_lora(slot, a[0], b[0])
    else:
        layer.set_lora(slot, list(a), list(b))


def reference(x, weight, bias, lora=None):
    """x W^T + bias + per slice x A_i^T B_i^T: what vLLM's base GEMM plus its LoRA ops compute."""
    out = x @ weight.T + (bias if bias is not None else 0)
    if lora is not None:
        out = out + torch.cat([x @ a.T @ b.T for a, b in zip(*lora)], dim=-1)
    return out


def mapped(layer, lora_ids):
    """A punica wrapper set for a step whose tokens run `lora_ids` (0: no LoRA), slot i holding id i + 1."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=16, device="cpu")
    layer.set_mapping(punica)
    punica.update_metadata(LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=True), [1, 2], LORA_SLOTS,
                           vocab_size=100)
    return punica


def run(layer, x, merged: bool):
    """The layer's output with the merged path on or off, and whether a merged weight was used."""
    vllm_cpu_lora.merge_single(merged)
    try:
        with torch.inference_mode():  # as the engine runs its forward
            return layer.apply(x, layer.base_layer.bias), "_tuneforge_merged" in layer.__dict__
    finally:
        vllm_cpu_lora.merge_single(False)


KINDS = ("column", "merged column", "qkv", "row")


@pytest.mark.parametrize("kind", KINDS)
def test_merged_path_equals_vllms_for_a_one_slot_step(vllm_layers, kind):
    layer, weight, bias = build_layer(kind, seed=10)
    adapters = adapter(layer, seed=11), adapter(layer, seed=12)
    for slot, (a, b) in enumerate(adapters):
        load(layer, slot, a, b)
    x = torch.randn(TOKENS, layer.input_size, generator=torch.Generator().manual_seed(13))
    for slot in (0, 1):
        punica = mapped(layer, [slot + 1] * TOKENS)
        assert punica.tuneforge_one_slot == slot
        want = reference(x, weight, bias, adapters[slot])
        vllms, used = run(layer, x, merged=False)
        assert not used
        merged, used = run(layer, x, merged=True)
        assert used
        torch.testing.assert_close(vllms, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged, reference(x, weight, bias), rtol=1e-3, atol=1e-3)
    # the base weight read back from vLLM's packed form is exactly the one loaded
    assert torch.equal(vllm_cpu_lora._base_weight(layer), weight)
    # a 3-D input (the transformers backend's [1, tokens, in]) keeps its shape
    mapped(layer, [2] * TOKENS)
    got, used = run(layer, x.unsqueeze(0), merged=True)
    assert used and got.shape == (1, TOKENS, sum(layer.output_slices))
    torch.testing.assert_close(got[0], reference(x, weight, bias, adapters[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_ids", [[1, 1, 2, 2, 2, 1, 1], [0, 0, 2, 2, 2, 2, 2], [0] * TOKENS],
                         ids=["two slots", "with base rows", "base only"])
def test_mixed_or_base_steps_take_vllms_path(vllm_layers, lora_ids):
    layer, weight, bias = build_layer("qkv", seed=20)
    adapters = adapter(layer, seed=21), adapter(layer, seed=22)
    for slot, (a, b) in enumerate(adapters):
        load(layer, slot, a, b)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(23))
    punica = mapped(layer, lora_ids)
    assert punica.tuneforge_one_slot is None
    got, used = run(layer, x, merged=True)
    assert not used and "_tuneforge_base" not in layer.__dict__
    torch.testing.assert_close(got, run(layer, x, merged=False)[0], rtol=0, atol=0)
    if lora_ids == [0] * TOKENS:
        torch.testing.assert_close(got, reference(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_rewritten_slot_rebuilds_its_merged_weight(vllm_layers):
    """set_lora and reset_lora write the stacked tensors in place, which bumps their version
    counters: the merged copy of the slot follows the new adapter, then the base model."""
    layer, weight, bias = build_layer("merged column", seed=30)
    first, second = adapter(layer, seed=31), adapter(layer, seed=32)
    load(layer, 0, *first)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(33))
    mapped(layer, [1] * TOKENS)
    vllm_cpu_lora.merge_single(True)
    try:
        with torch.inference_mode():
            got_first = layer.apply(x)
            cached = layer.__dict__["_tuneforge_merged"][3]
            layer.apply(x)
            assert layer.__dict__["_tuneforge_merged"][3] is cached  # the next step reuses it
            load(layer, 0, *second)  # vLLM loads an adapter under inference mode too
            got_second = layer.apply(x)
            layer.reset_lora(0)
            got_reset = layer.apply(x)
        assert layer in vllm_cpu_lora._CACHED
    finally:
        vllm_cpu_lora.merge_single(False)
    assert "_tuneforge_merged" not in layer.__dict__ and layer not in vllm_cpu_lora._CACHED  # off drops the copies
    torch.testing.assert_close(got_first, reference(x, weight, bias, first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_second, reference(x, weight, bias, second), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_reset, reference(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_slot_without_this_layers_lora_runs_the_base_gemm_alone(vllm_layers):
    """An adapter that leaves a module out (its slot's B is zeros there): no merged copy, the
    base layer's own GEMM."""
    layer, weight, bias = build_layer("row", seed=40)
    load(layer, 0, *adapter(layer, seed=41))
    x = torch.randn(TOKENS, 40, generator=torch.Generator().manual_seed(42))
    mapped(layer, [2] * TOKENS)  # slot 1: nothing loaded
    got, used = run(layer, x, merged=True)
    assert not used and "_tuneforge_base" not in layer.__dict__
    torch.testing.assert_close(got, reference(x, weight, bias), rtol=1e-5, atol=1e-5)
    mapped(layer, [1] * TOKENS)
    assert run(layer, x, merged=True)[1]


@pytest.mark.parametrize("merged", [False, True])
def test_lm_head_and_embedding_lora_is_skipped_only_for_a_slot_without_one(merged, monkeypatch):
    """The punica wrapper's lm_head (logits) and embedding LoRA ops: on a one-slot step whose
    adapter has none (its B is zeros) the merged path adds nothing; otherwise vLLM's ops run."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    vllm_cpu_lora.install()
    vocab, generator = 40, torch.Generator().manual_seed(50)
    logits_a = torch.randn(2, 1, RANK, IN, generator=generator)
    logits_b = torch.zeros(2, 1, vocab, RANK)
    logits_b[0] = torch.randn(1, vocab, RANK, generator=generator)  # only slot 0's adapter has an lm_head LoRA
    embed_b = torch.zeros(2, 1, OUT, RANK)
    embed_b[0] = torch.randn(1, OUT, RANK, generator=generator)
    hidden = torch.randn(TOKENS, IN, generator=generator)
    embed_a = torch.randn(TOKENS, RANK, generator=generator)  # the gathered embedding A rows
    vllm_cpu_lora.merge_single(merged)
    try:
        for lora_id, changes in ((1, True), (2, False)):
            punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=16, device="cpu")
            punica.update_metadata(LoRAMapping((lora_id,) * TOKENS, (lora_id,) * TOKENS, is_prefill=True), [1, 2],
                                   2, vocab_size=vocab)
            logits, embedded = torch.randn(TOKENS, vocab, generator=generator), torch.randn(TOKENS, OUT)
            got_logits, got_embedded = logits.clone(), embedded.clone()
            with monkeypatch.context() as patch:
                if merged and not changes:  # skipped: vLLM's ops are not called at all
                    from vllm.lora.punica_wrapper import punica_cpu

                    for name in ("bgmv_shrink", "bgmv_expand", "sgmv_expand"):
                        patch.setattr(punica_cpu, name, None)
                punica.add_lora_logits(got_logits, hidden, logits_a, logits_b, 1.0)
                punica.add_lora_embedding(got_embedded, embed_a, embed_b, True)
            slot = lora_id - 1
            torch.testing.assert_close(got_logits, logits + hidden @ logits_a[slot, 0].T @ logits_b[slot, 0].T,
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_embedded, embedded + embed_a @ embed_b[slot, 0].T, rtol=1e-5, atol=1e-5)
            assert not torch.equal(got_logits, logits) if changes else torch.equal(got_logits, logits)
    finally:
        vllm_cpu_lora.merge_single(False)
