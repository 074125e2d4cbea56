"""The published model files of a model whose parameters are sharded across ranks (ZeRO-3,
FSDP2), written by rank 0 one parameter at a time: every rank takes part in gathering each
parameter, rank 0 appends it to the safetensors file and drops it, so no rank ever holds the
whole model. The files are those `save_pretrained` writes for one process: a Hugging Face
model directory (config.json, generation_config.json, model.safetensors, or shards with their
index past `max_shard_size`) or, for a PEFT model, its adapter (only the trainable
parameters are gathered, to rank 0 alone)."""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import torch

from services.trainer import vocabulary

# safetensors' names for torch dtypes
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = 50 * 10**9  # transformers' default for save_pretrained ("50GB")

# Collective: every rank calls it with the same parameter, in the same order; rank 0 gets the
# whole tensor on the CPU, the other ranks None.
Gather = Callable[[torch.Tensor], "torch.Tensor | None"]


def _saved_tensors(module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter or buffer) that save_pretrained writes, in state-dict order: a tensor
    shared by several names (tied embeddings) once, under its first name; non-persistent
    buffers and `_keys_to_ignore_on_save` left out."""
    ignored = set(getattr(module, "_keys_to_ignore_on_save", None) or [])
    seen: set[int] = set()
    found = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen or name in ignored:
            continue
        seen.add(id(tensor))
        found.append((name, tensor))
    return found


def _shape(tensor: torch.Tensor) -> list[int]:
    """The whole tensor's shape: a ZeRO-3 partition keeps it as `ds_shape`, a DTensor as its shape."""
    return list(getattr(tensor, "ds_shape", tensor.shape))


def _converts_names(module) -> bool:
    """Whether save_pretrained renames or reshapes this model's weights on save (transformers'
    weight conversions): streaming writes the in-memory names only."""
    if getattr(module, "_weight_conversions", None):
        return True
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return False
    return any(not isinstance(c, PrefixChange) for c in get_model_conversion_mapping(module, add_legacy=False) or [])


def _shards(entries: list[tuple[str, torch.dtype, list[int]]], max_shard_size: int) -> list[list[int]]:
    """Indices of `entries` per shard file, in order; a tensor larger than the limit gets its own."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_name, dtype, shape) in enumerate(entries):
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()


def _header(entries: list[tuple[str, torch.dtype, list[int]]]) -> bytes:
    """A safetensors header for tensors laid out one after another in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
        end = offset + _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(encoded).to_bytes(8, "little") + encoded


def _write_tensor(f, tensor: torch.Tensor) -> None:
    f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_model(directory: pathlib.Path | None, module, gather: Gather, max_shard_size: int = MAX_SHARD_SIZE) -> None:
    """Collective: every rank calls it; rank 0 (the one whose `directory` is not None)
    writes the published files into `directory`."""
    if hasattr(module, "peft_config"):
        _write_adapter(directory, module, gather)
    else:
        _write_full(directory, module, gather, max_shard_size)


def _write_adapter(directory: pathlib.Path | None, module, gather: Gather) -> None:
    """The trainable parameters (LoRA matrices, modules_to_save) are what an adapter holds: only
    they are gathered; PEFT names and writes them."""
    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            whole = gather(param)
            if whole is not None:
                state[name] = whole
    if directory is not None:
        module.save_pretrained(directory, state_dict=state, **vocabulary.save_kwargs(module))


def _write_full(directory: pathlib.Path | None, module, gather: Gather, max_shard_size: int) -> None:
    if _converts_names(module):
        # Rare (models with conversion mappings): their saved names come from the whole state dict.
        state = {name: gather(tensor) for name, tensor in _saved_tensors(module)}
        if directory is not None:
            module.save_pretrained(directory, state_dict=state, max_shard_size=max_shard_size)
        return
    tensors = _saved_tensors(module)
    entries = [(name, tensor.dtype, _shape(tensor)) for name, tensor in tensors]
    if directory is not None:
        _write_config(directory, module)
    shards = _shards(entries, max_shard_size)
    names = [WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for filename, indices in zip(names, shards):
        with _open(directory, filename) as f:
            if f is not None:
                f.write(_header([entries[i] for i in indices]))
            for i in indices:
                whole = gather(tensors[i][1])
                if f is not None:
                    _write_tensor(f, whole)
                del whole  # before the next one is gathered
    if directory is not None and len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(_numel(s) for _n, _d, s in entries),
                              "total_size": sum(_nbytes(d, s) for _n, d, s in entries)},
                 "weight_map": {entries[i][0]: filename for filename, indices in zip(names, shards) for i in indices}}
        (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class _open:
    """The shard file on rank 0; nothing on the others."""

    def __init__(self, directory: pathlib.Path | None, filename: str):
        self.path = directory / filename if directory is not None else None
        self.file = None

    def __enter__(self):
        if self.path is not None:
            self.file = open(self.path, "wb")
        return self.file

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def _write_config(directory: pathlib.Path, module) -> None:
    """config.json and generation_config.json as save_pretrained writes them."""
    config = module.config
    config.dtype = str(module.dtype).split(".")[1]
    config.architectures = [type(module).__name__.removeprefix("FSDP")]
    config.save_pretrained(directory)
    if module.can_generate():
        module.generation_config.save_pretrained(directory)

