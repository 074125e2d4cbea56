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
tokens either way): 0.36 s of CPU against 0.51-0.54 s with vLLM's ops."""

from __future__ import annotations

_INSTALLED = False


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


def install() -> None:
    """Points vLLM's CPU punica wrapper's sgmv ops at the fast paths (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    fast = _fast_ops(torch_ops)
    for name in SGMV:
        setattr(punica_cpu, name, fast[name])
    _INSTALLED = True
