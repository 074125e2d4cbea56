"""The Generator seam: what an online method asks of whatever generates its completions
(transformers with the policy itself, a colocated vLLM engine, the serving service), and
the sampling parameters and completions that cross it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    n: int  # completions per prompt
    max_tokens: int  # --max_completion_length
    temperature: float
    top_p: float = 1.0
    top_k: int = -1  # -1: off (vLLM's convention); transformers gets 0/None
    stop_token_ids: tuple[int, ...] = ()  # the tokenizer's EOS (and the template's end-of-turn)


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # generated ids, INCLUDING the stop token when one ended it
    finished: bool  # True: ended on a stop token; False: hit max_tokens


class Generator(Protocol):
    """Generates sampling.n completions per prompt, prompt i seeded with seeds[i] (so a rerun,
    a resume and a run on more ranks draw the same completions where the back end allows).

    `sync` gets the unwrapped policy (a PEFT model for LoRA, the plain model for full; the
    engine unwraps DDP/DeepSpeed/FSDP first and gathers the full state dict under ZeRO-3 and
    FSDP2) and pushes its weights to the generator before the rollout of `step`."""

    name: str  # "transformers", "vllm-colocate", "vllm-server"

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[list[Completion]]: ...

    def sync(self, model: torch.nn.Module, step: int) -> None: ...

    def close(self) -> None: ...
