"""What every vLLM engine of TuneForge (serving's, and the trainer's colocated one) sets up
the same way on this machine: the environment defaults read when an engine starts, the
weights dtype, and the LoRA ranks vLLM's kernels are built for."""

from __future__ import annotations

import os

# vLLM sizes its LoRA kernels for these ranks only (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM seeds each request's torch.Generator with its seed (completion i of n: seed + i); 64 bits.
MAX_SEED = 2**64 - 1


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def platform_defaults(torch_dtype: str | None) -> str:
    """Environment defaults and the dtype for this machine. Set before the engine
    starts: its core process reads the environment when it spawns."""
    # Our JSON log handler on the root logger gets vLLM's records too, unless the user asks otherwise.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    if on_cpu():
        from libs.common import vllm_cpu_lora

        # one matrix product per LoRA slice where a batch runs one adapter (vLLM's ops gather per token)
        vllm_cpu_lora.install()
        # vLLM's CPU default reserves a large KV cache; 1 GiB serves small models and leaves room.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # CPU kernels have no half-precision LoRA path worth using; float32 is exact and fast enough.
        return torch_dtype or "float32"
    return torch_dtype or "auto"


def lora_slot_rank(rank: int) -> int:
    """The smallest rank vLLM's kernels are built for that holds an adapter of `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])
