"""Rows without a LoRA left alone by vLLM's PyTorch LoRA ops (the CPU backend's): the
patch, and the worker extension that installs it in vLLM's engine process.

vLLM's torch ops pick each row's adapter weights by indexing the stacked slots with the
row's slot number, and a row without a LoRA has slot -1, which Python's indexing makes the
LAST slot: in a batch mixing the base model with adapters, the base rows got that slot's
adapter (seen: 39 of 40 concurrent base answers were an adapter's, on vLLM's own server
too). CUDA's Triton kernels skip slot -1. Here each bgmv op runs on the rows that have a
slot and writes nothing else (the shrink writes zeros there, as the Triton kernels leave
their zero-initialized buffers); the sgmv ops (what vLLM v1 always calls on CPU) go
through these bgmv ops. A batch without any LoRA row never reaches them: vLLM's punica
wrapper returns first (`no_lora`), so base-only traffic costs what it costs vLLM's server.
Upstream fix: vllm-project/vllm PR #48421 (open at vLLM 0.32); drop this module with it.

vLLM builds the model in its engine-core process, so the patch must be installed there:
`Engine.start` names `WorkerExtension` as vLLM's `worker_extension_cls`, which vLLM
imports in the process that runs the model before it builds the model; importing this
module installs the patch (idempotent), and `Engine.mix_safely` asks the worker
through `collective_rpc` whether it is in place. It installs libs.common.vllm_cpu_lora's
one-adapter fast path there too (the sgmv ops; batches with rows without a LoRA still
reach the masked ops here), whose merged path `Engine.merge_single_lora` turns on
(--lora_merge_single) through the same extension."""

from __future__ import annotations

import functools
import sys

from libs.common import vllm_cpu_lora

# Where vLLM 0.32 binds the torch bgmv ops: sgmv_* call them through lora_ops' globals, the
# CPU punica wrapper and the package re-export bind the names at import.
_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")


def _shrink(original):
    @functools.wraps(original)
    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        has_lora = lora_indices_tensor >= 0  # [tokens]
        if bool(has_lora.all()):
            return original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        rank = lora_b_weights.shape[-2]
        output_tensor[~has_lora, :rank] = 0
        rows = has_lora.nonzero().squeeze(1)
        if rows.numel():
            part = output_tensor[rows]  # [rows, rank]: a copy, written back below
            original(inputs[rows], lora_b_weights, part, lora_indices_tensor[rows], scaling)
            output_tensor[rows] = part
    bgmv_shrink.tuneforge_masked = True
    return bgmv_shrink


def _expand(original):
    @functools.wraps(original)
    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        has_lora = lora_indices_tensor >= 0
        if bool(has_lora.all()) or inputs.shape[0] != output_tensor.shape[0]:
            return original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        if not add_inputs:
            output_tensor[~has_lora, :lora_b_weights.shape[-2]] = 0
        rows = has_lora.nonzero().squeeze(1)
        if rows.numel():
            part = output_tensor[rows]
            original(inputs[rows], lora_b_weights, part, lora_indices_tensor[rows], add_inputs)
            output_tensor[rows] = part
    bgmv_expand.tuneforge_masked = True
    return bgmv_expand


def _expand_slice(original):
    @functools.wraps(original)
    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                          add_inputs=True):
        has_lora = lora_indices_tensor >= 0
        if bool(has_lora.all()):
            return original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                            add_inputs)
        if not add_inputs:
            output_tensor[~has_lora, slice_offset:slice_offset + slice_size] = 0
        rows = has_lora.nonzero().squeeze(1)
        if rows.numel():
            part = output_tensor[rows]
            original(inputs[rows], lora_b_weights, part, lora_indices_tensor[rows], slice_offset, slice_size,
                     add_inputs)
            output_tensor[rows] = part
    bgmv_expand_slice.tuneforge_masked = True
    return bgmv_expand_slice


_WRAPPERS = {"bgmv_shrink": _shrink, "bgmv_expand": _expand, "bgmv_expand_slice": _expand_slice}


def install() -> None:
    """Replaces vLLM's torch bgmv ops wherever vLLM bound them; a second call changes nothing."""
    import importlib

    from vllm.lora.ops.torch_ops import lora_ops

    for name, wrap in _WRAPPERS.items():
        op = getattr(lora_ops, name)
        masked = op if getattr(op, "tuneforge_masked", False) else wrap(op)
        for module_name in _MODULES:
            setattr(importlib.import_module(module_name), name, masked)


def installed() -> bool:
    """Whether every place vLLM calls the bgmv ops from calls the masked ones."""
    return all(getattr(getattr(sys.modules.get(module_name), name, None), "tuneforge_masked", False)
               for module_name in _MODULES for name in _WRAPPERS)


class WorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its method is callable
    through `AsyncLLM.collective_rpc`."""

    def tuneforge_lora_rows_masked(self) -> bool:
        return installed()

    def tuneforge_lora_merge_single(self, enabled: bool) -> bool:
        """Turns libs.common.vllm_cpu_lora's merged path on or off in this process (the one
        that runs the model); returns whether it is on."""
        return vllm_cpu_lora.merge_single(enabled)


install()
# The engine process's other CPU LoRA patch: one matrix product per slice where a whole batch runs one adapter.
vllm_cpu_lora.install()
