"""A faster path for vLLM's CPU LoRA ops when every token of a batch runs the same adapter slot
(a rollout server generating one job's policy, an adapter's chat traffic alone): one matrix
product per LoRA slice instead of vLLM's torch ops, which gather each token's copy of the
adapter weights ([tokens, rank, in]) and contract them with a batched einsum. It replaces the
sgmv forms the CPU punica wrapper calls (vLLM v1 on CPU always calls those); batches mixing
slots, or holding rows without a LoRA (slot -1), go to the ops bound in vllm.lora.ops.torch_ops
unchanged (in serving's engine process, services/serving/lora_mask.py's masked ones).

Installed where the model runs: by libs.common.vllm_platform.platform_defaults in the process
that calls it (the colocated engine), and by serving's worker extension in its engine process.
Measured (default model, one rollout of 2 prompts x 8 x 128 tokens as one adapter, the same
tokens either way): 0.36 s of CPU against 0.51-0.54 s with vLLM's ops.

With `merge_single(True)` (serving's --lora_merge_single) a step whose tokens all run one slot
skips the LoRA ops altogether: each LoRA linear layer computes x @ (W + B A)^T (+ bias) with
W + B A of that slot cached on the layer, one matrix product (vLLM's own CPU GEMM) instead of
three; a layer the slot's adapter leaves out (B zeros) runs its base GEMM alone, and the
lm_head and embedding LoRA ops are skipped where they would add zeros. vLLM's CPU backend
packs W for oneDNN and drops the plain tensor, so W is read back once per layer (the packed
product of an identity) and kept: the cost is about three copies of every LoRA-targeted
weight (W, the merged one and its packed form). The merged copy is rebuilt when the slot
changes or its adapter tensors are written (their version counters: set_lora and reset_lora
write in place). Measured (bench/rollout_lora_merge.py, the rollout above without early
stops, 2048 tokens): 0.84 s of the engine's CPU against 1.10 s without, 0.80 s on the base
model alone; the same tokens."""

from __future__ import annotations

import functools
import weakref

import torch

_INSTALLED = False
# The merged path is on in this process (the engine's): set through `merge_single`.
_MERGE_SINGLE = False
# Layers holding a merged copy, dropped when the merged path is turned off.
_CACHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _one_slot(indices) -> int | None:
    """The slot every token uses, or None where they differ, where it is -1 (no LoRA: vLLM's
    indexing would read the last slot) or where there are none."""
    if indices.numel() == 0:
        return None
    first = int(indices[0])
    return first if first >= 0 and bool((indices == first).all()) else None


def _weights(stacked, slot: int, dtype):
    """[out, in] of one slot of vLLM's stacked [slots, 1, out, in] (or [slots, out, in])."""
    weights = stacked[slot]
    if weights.dim() == 3:
        weights = weights.squeeze(0)
    return weights.to(dtype=dtype)


def _fast_ops(ops):
    """Replacements for vllm.lora.ops.torch_ops' six functions (same signatures and results)."""

    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        slot = _one_slot(lora_indices_tensor)
        if slot is None:
            return ops.bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        dtype = output_tensor.dtype
        outputs = inputs.to(dtype) @ _weights(lora_a_weights, slot, dtype).T  # [tokens, rank]
        output_tensor[:, : outputs.shape[1]] = scaling * outputs

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        slot = _one_slot(lora_indices_tensor)
        if slot is None:
            return ops.bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        dtype = output_tensor.dtype
        outputs = inputs.to(dtype) @ _weights(lora_b_weights, slot, dtype).T  # [tokens, out]
        limit = output_tensor.shape[0]
        if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
            limit = 1
        common = min(outputs.shape[1], output_tensor.shape[1])
        if add_inputs:
            output_tensor[:, :common] += outputs[:limit, :common]
        else:
            output_tensor[:, :common] = outputs[:limit, :common]

    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                          add_inputs=True):
        slot = _one_slot(lora_indices_tensor)
        if slot is None:
            return ops.bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                                         slice_size, add_inputs)
        dtype = output_tensor.dtype
        outputs = inputs.to(dtype) @ _weights(lora_b_weights, slot, dtype).T  # [tokens, slice]
        if add_inputs:
            output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
        else:
            output_tensor[:, slice_offset: slice_offset + slice_size] = outputs

    # The sgmv (prefill) forms expand each request's slot over its tokens and call the bgmv
    # forms: one slot for every request is one slot for every token.
    def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                    batches, max_seq_length, token_nums, scaling):
        if _one_slot(lora_indices_tensor) is None:
            return ops.sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                   lora_indices_tensor, batches, max_seq_length, token_nums, scaling)
        bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor[:1], scaling)

    def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                    batches, max_seq_length, token_nums, add_inputs=False):
        if _one_slot(lora_indices_tensor) is None:
            return ops.sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                   lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs)
        bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor[:1], add_inputs)

    def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                          batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
        if _one_slot(lora_indices_tensor) is None:
            return ops.sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                         lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                                         slice_size, add_inputs)
        bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor[:1], slice_offset, slice_size,
                          add_inputs)

    return {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
            "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice}


SGMV = ("sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


# -- the merged path: one slot for the whole step, W + B A in one matrix product -----------------


def merge_single(enabled: bool) -> bool:
    """Turns the merged path on or off in this process; off drops every merged copy."""
    global _MERGE_SINGLE
    _MERGE_SINGLE = bool(enabled)
    if not _MERGE_SINGLE:
        for layer in list(_CACHED):
            layer.__dict__.pop("_tuneforge_merged", None)
            layer.__dict__.pop("_tuneforge_base", None)
        _CACHED.clear()
    return _MERGE_SINGLE


def _mergeable(layer) -> bool:
    """An unquantized, unsharded LoRA linear layer whose slices cover its output: the layers
    whose LoRA vLLM adds as output += sum over slices of x A_i^T B_i^T. Decided once per layer."""
    known = layer.__dict__.get("_tuneforge_mergeable")
    if known is None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        base = layer.base_layer
        slices = tuple(getattr(layer, "output_slices", ()))
        known = (isinstance(getattr(base, "quant_method", None), UnquantizedLinearMethod)
                 and (base.weight.numel() > 0 or callable(getattr(base, "cpu_linear", None)))
                 and layer.tp_size == 1 and not getattr(layer, "_enable_aux_cuda_stream", False)
                 and base.weight.dtype == torch.float32
                 and len(slices) == len(layer.lora_a_stacked) == len(layer.lora_b_stacked) > 0
                 and sum(slices) == getattr(base, "output_size_per_partition", None)
                 and all(a.shape[-1] == getattr(base, "input_size_per_partition", None)
                         for a in layer.lora_a_stacked)
                 and all(not t.is_inference() for t in (*layer.lora_a_stacked, *layer.lora_b_stacked)))
        layer.__dict__["_tuneforge_mergeable"] = known
    return known


def _base_weight(layer) -> torch.Tensor:
    """W [out, in] of the base layer. vLLM's CPU backend packs it for its GEMM (oneDNN, or
    zentorch) and leaves an empty tensor: then it is read back as the packed product of an
    identity (exact: one nonzero term per output), once per packing."""
    base = layer.base_layer
    if base.weight.dim() == 2 and base.weight.numel():
        return base.weight
    linear = getattr(base, "cpu_linear", None)
    cached = layer.__dict__.get("_tuneforge_base")
    if cached is not None and cached[0] is linear:
        return cached[1]
    eye = torch.eye(base.input_size_per_partition, dtype=base.weight.dtype)  # [in, in]
    weight = linear(eye, base.weight, None).t().contiguous()  # [out, in]
    layer.__dict__["_tuneforge_base"] = (linear, weight)
    return weight


def _merged_linear(layer, slot: int):
    """(W + B A of `slot` [out, in], the GEMM that multiplies by it): the slices' B A stacked as
    vLLM adds them (scale 1: vLLM folds the LoRA scaling into B when it loads an adapter), and
    the GEMM vLLM's CPU backend picks for a weight of that shape (oneDNN with a packed copy
    here: 1.0-1.6x faster than torch's for 16 tokens of the default model's layers)."""
    base = _base_weight(layer)
    # A weight read back from its packed form is never written; the plain one is versioned too.
    versions = tuple(t._version for t in (*layer.lora_a_stacked, *layer.lora_b_stacked,
                                          *((base,) if base is layer.base_layer.weight else ())))
    cached = layer.__dict__.get("_tuneforge_merged")
    if cached is not None and cached[0] == slot and cached[1] is base and cached[2] == versions:
        return cached[3], cached[4]
    with torch.no_grad():
        delta = torch.cat([_weights(b, slot, torch.float32) @ _weights(a, slot, torch.float32)  # [out_i, in]
                           for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked)])
        merged = base + delta.to(base.dtype)
    linear = _cpu_linear(merged) if hasattr(layer.base_layer, "cpu_linear") else torch.nn.functional.linear
    layer.__dict__["_tuneforge_merged"] = (slot, base, versions, merged, linear)
    _CACHED.add(layer)
    return merged, linear


def _cpu_linear(weight: torch.Tensor):
    """vLLM's CPU GEMM for `weight` [out, in], as its unquantized layers get theirs (the weight
    kept: a packed form may refer to it)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return holder.cpu_linear


def _slot_is_zero(stacked: torch.Tensor, slot: int) -> bool:
    """Whether `slot` of a stacked LoRA tensor is all zeros (its adapter has no LoRA on this
    module: vLLM's LoRA ops would add zeros), remembered until the tensor is written."""
    key = (slot, stacked._version)
    cached = getattr(stacked, "_tuneforge_zero", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    zero = not bool(stacked[slot].any())
    stacked._tuneforge_zero = (key, zero)
    return zero


def _merged_apply(original):
    """vLLM's BaseLinearLayerWithLoRA._apply_sync (base GEMM, then the LoRA ops), or with the
    merged path on and one slot for every token of the step, the merged weight's product (the
    base GEMM alone where the slot's adapter leaves this layer out)."""

    @functools.wraps(original)
    def _apply_sync(self, x, bias=None):
        if _MERGE_SINGLE and x.ndim in (2, 3):
            slot = getattr(getattr(self, "punica_wrapper", None), "tuneforge_one_slot", None)
            if slot is not None and _mergeable(self):
                if all(_slot_is_zero(b, slot) for b in self.lora_b_stacked):
                    return self._get_quant_method().apply(self.base_layer, x, bias)
                weight, linear = _merged_linear(self, slot)
                return linear(x, weight, bias)
        return original(self, x, bias)

    _apply_sync.tuneforge_merged = True
    return _apply_sync


def _one_slot_per_step(original):
    """The punica wrapper's update_metadata (once per step whose slots differ from the last
    one's), noting the one slot of every token (and of every sequence sampled) or None, for
    every layer of the step to read."""

    @functools.wraps(original)
    def update_metadata(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.tuneforge_one_slot = _one_slot(self.token_lora_indices)
        self.tuneforge_one_sampler_slot = _one_slot(self.sampler_indices)

    update_metadata.tuneforge_one_slot = True
    return update_metadata


def _skip_zero_logits(original):
    """The punica wrapper's add_lora_logits (the lm_head's LoRA), skipped on a one-slot step
    whose adapter has no lm_head LoRA (all-linear adapters: PEFT leaves lm_head out): vLLM
    gathers a [vocab, rank] B per sequence to add zeros."""

    @functools.wraps(original)
    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs):
        slot = getattr(self, "tuneforge_one_sampler_slot", None)
        if _MERGE_SINGLE and slot is not None and _slot_is_zero(lora_b_stacked, slot):
            return None
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)

    add_lora_logits.tuneforge_merged = True
    return add_lora_logits


def _skip_zero_embedding(original):
    """The punica wrapper's add_lora_embedding (the input embedding's LoRA), skipped on a
    one-slot step whose adapter has no embedding LoRA."""

    @functools.wraps(original)
    def add_lora_embedding(self, y, x, lora_b_stacked, *args, **kwargs):
        slot = getattr(self, "tuneforge_one_slot", None)
        if _MERGE_SINGLE and slot is not None and _slot_is_zero(lora_b_stacked, slot):
            return None
        return original(self, y, x, lora_b_stacked, *args, **kwargs)

    add_lora_embedding.tuneforge_merged = True
    return add_lora_embedding


def install() -> None:
    """Points vLLM's CPU punica wrapper's sgmv ops at the fast paths, and its LoRA linear
    layers at the merged path, off until `merge_single(True)` (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    fast = _fast_ops(torch_ops)
    for name in SGMV:
        setattr(punica_cpu, name, fast[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    if not getattr(wrapper.update_metadata, "tuneforge_one_slot", False):
        wrapper.update_metadata = _one_slot_per_step(wrapper.update_metadata)
    if not getattr(wrapper.add_lora_logits, "tuneforge_merged", False):
        wrapper.add_lora_logits = _skip_zero_logits(wrapper.add_lora_logits)
        wrapper.add_lora_embedding = _skip_zero_embedding(wrapper.add_lora_embedding)
    if not getattr(BaseLinearLayerWithLoRA._apply_sync, "tuneforge_merged", False):
        BaseLinearLayerWithLoRA._apply_sync = _merged_apply(BaseLinearLayerWithLoRA._apply_sync)
    _INSTALLED = True
