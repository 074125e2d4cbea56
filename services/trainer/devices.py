"""Where a training rank computes and in which precision: its device (`cuda:LOCAL_RANK` when
CUDA is present, else the CPU; `--device` forces one), the process-group backend (nccl on
CUDA, gloo on the CPU; `--ddp_backend` overrides), the attention kernel (`--attn_impl`) and
whether it can run here, and the mixed precision of `--torch_dtype`.

Precision: float32 trains exactly as it always did (no autocast, no scaler). bfloat16 and
float16 keep float32 master weights (every trainable parameter is float32, so AdamW updates
float32 numbers) and run the forward under torch.autocast on the device type; float16 scales
the loss (torch.amp.GradScaler, whose state a checkpoint keeps). Frozen weights (a LoRA base,
a separate reference model) stay in torch_dtype: they never take an update. DeepSpeed (its
bf16/fp16 sections) and FSDP2 (MixedPrecisionPolicy) apply their own mixed precision instead
of autocast (services.trainer.distributed).

The flag checks import torch only when a flag names CUDA or a kernel: they run in the CLI
and the service, which must not pay for it otherwise.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from libs.common.errors import InvalidArgument

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DDP_BACKENDS = ("nccl", "gloo")
# transformers' attn_implementation names, as ms-swift's --attn_impl takes them
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _wants_cuda(config) -> bool | None:
    """True or False when the flags alone decide it; None when it depends on the machine."""
    if config.device == "cpu":
        return False
    if config.device.startswith("cuda"):
        return True
    return None


def problems(config, count: int | None = None) -> list[str]:
    """Problems of --device, --ddp_backend and --attn_impl, each naming its flag. `count` is
    this machine's CUDA devices (looked up only when a flag needs it)."""
    found: list[str] = []
    if not _DEVICE.match(config.device or ""):
        found.append(f"device: expected auto, cpu, cuda or cuda:N; got {config.device!r}")
        return found
    if config.ddp_backend is not None and config.ddp_backend not in DDP_BACKENDS:
        found.append(f"ddp_backend: expected one of {', '.join(DDP_BACKENDS)}; got {config.ddp_backend!r}")
    if config.attn_impl is not None and config.attn_impl not in ATTN_IMPLS:
        found.append(f"attn_impl: expected one of {', '.join(ATTN_IMPLS)}; got {config.attn_impl!r}")
    if found:
        return found
    if config.device.startswith("cuda:") and config.nproc_per_node > 1:
        found.append(f"device: {config.device} names one GPU, but nproc_per_node {config.nproc_per_node} starts a "
                     f"process per GPU (each rank takes cuda:LOCAL_RANK); use --device cuda")
    needs_count = (config.device != "cpu" or config.ddp_backend == "nccl"
                   or config.attn_impl in ("flash_attention_2", "flex_attention"))
    if not needs_count:
        return found
    count = cuda_count() if count is None else count
    on_cuda = _wants_cuda(config)
    on_cuda = count > 0 if on_cuda is None else on_cuda
    if config.device.startswith("cuda") and count == 0:
        found.append(f"device: {config.device} asked for, but this machine has no CUDA device ({_torch_build()}); "
                     f"use --device cpu or auto")
    elif config.device.startswith("cuda:") and int(config.device[5:]) >= count:
        found.append(f"device: {config.device} asked for, but this machine has {count} CUDA device(s) "
                     f"(cuda:0 to cuda:{count - 1})")
    elif on_cuda and config.nproc_per_node > count:
        found.append(f"nproc_per_node: {config.nproc_per_node} processes on this node train on one GPU each, but "
                     f"this machine has {count} CUDA device(s); lower it, or train on the CPU with --device cpu")
    if config.ddp_backend == "nccl" and not on_cuda:
        found.append("ddp_backend: nccl needs CUDA devices, and this job trains on the CPU; use gloo (the default "
                     "on the CPU)")
    if config.attn_impl == "flash_attention_2":
        if not on_cuda:
            found.append("attn_impl: flash_attention_2 runs on CUDA devices only, and this job trains on the CPU; "
                         "use sdpa or eager")
        elif not _has_flash_attn():
            found.append("attn_impl: flash_attention_2 needs the flash_attn package, which is not installed "
                         "(pip install flash-attn); or use sdpa")
    if config.attn_impl == "flex_attention" and not on_cuda:
        found.append(f"attn_impl: flex_attention has no backward pass on the CPU ({_torch_build()}); use sdpa or "
                     f"eager, or train on a CUDA device")
    return found


def _torch_build() -> str:
    import torch

    return f"torch {torch.__version__}"


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve(config, local_rank: int = 0):
    """The torch.device this rank computes on. Raises InvalidArgument (field device) when
    the one asked for is not here."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    count = cuda_count()
    index = int(device[5:]) if device.startswith("cuda:") else local_rank
    if index >= count:
        raise InvalidArgument(f"{config.device} asked for (rank {local_rank}), but this machine has {count} CUDA "
                              f"device(s) ({_torch_build()})", field="device")
    return torch.device("cuda", index)


def rank_device(config):
    """This process's device, from torchrun's LOCAL_RANK (0 in one process)."""
    from services.trainer.distributed import world_from_env

    return resolve(config, world_from_env().local_rank)


def place(model, device):
    """The model on `device`. A 4-bit model is left where it was loaded (bitsandbytes
    quantizes while loading onto the device; moving one again is refused)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit",
                                                                 False):
        return model
    return model.to(device)


def backend(config, device) -> str:
    """The process-group backend: --ddp_backend, else nccl on CUDA and gloo on the CPU."""
    chosen = config.ddp_backend or ("nccl" if device.type == "cuda" else "gloo")
    if chosen == "nccl" and device.type != "cuda":
        raise InvalidArgument("nccl needs CUDA devices, and this job trains on the CPU; use gloo",
                              field="ddp_backend")
    return chosen


def mixed(config) -> bool:
    """bfloat16 or float16: float32 masters, lower-precision compute."""
    return config.torch_dtype != "float32"


def compute_dtype(config):
    import torch

    return getattr(torch, config.torch_dtype)


def load_dtype(config):
    """The dtype weights are loaded in: float32 when they are all trained (full: they are the
    master weights), torch_dtype for a frozen base under adapters."""
    import torch

    return torch.float32 if config.train_type == "full" else compute_dtype(config)


def master_weights(model) -> None:
    """Every trainable parameter in float32 (PEFT already makes LoRA weights float32 on a
    bf16/fp16 base; modules_to_save copies and a reward head come in the base's dtype)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


@contextlib.contextmanager
def autocast(config, device) -> Iterator[None]:
    """The forward's precision: torch.autocast in torch_dtype on the device type when mixed;
    nothing at all for float32 (bitwise as before)."""
    if not mixed(config):
        yield
        return
    import torch

    with torch.autocast(device.type, dtype=compute_dtype(config)):
        yield


def grad_scaler(config, device):
    """float16's dynamic loss scaler (None otherwise: bfloat16 has float32's range)."""
    if config.torch_dtype != "float16":
        return None
    import torch

    return torch.amp.GradScaler(device.type)


def to_device(value: Any, device) -> Any:
    """Tensors of nested dicts, lists and tuples moved to `device` (the rest as they are)."""
    if hasattr(value, "to") and hasattr(value, "device"):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
