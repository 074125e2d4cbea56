"""Generation with transformers `generate` on the policy itself (no --use_vllm): the slow
baseline, and the exact one. Each prompt is generated alone (its sampling.n completions in one
batch, no padding) from its own seed, on a forked RNG, so what a prompt gets depends on its
seed and the weights only: not on which prompts share its rollout or rank, nor on the
training's random streams, which it leaves as they were."""

from __future__ import annotations

import contextlib

import torch

from services.trainer import devices
from services.trainer.rollout.base import Completion, Sampling


class TransformersGenerator:
    name = "transformers"

    def __init__(self, policy: torch.nn.Module, pad_id: int, config=None):
        self.policy = policy  # the unwrapped policy (PEFT or plain): generating needs no back end
        self.pad_id = pad_id
        self.config = config  # for autocast under --torch_dtype bfloat16/float16

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[list[Completion]]:
        from transformers import GenerationConfig

        stop = list(sampling.stop_token_ids)
        generation = GenerationConfig(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0, max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n, eos_token_id=stop or None, pad_token_id=self.pad_id,
            repetition_penalty=1.0)
        device = next(self.policy.parameters()).device
        training = self.policy.training
        self.policy.eval()  # sampling from the policy, not from a dropout-perturbed copy of it
        try:
            out = []
            for prompt, seed in zip(prompts, seeds):
                ids = torch.tensor([prompt], dtype=torch.long, device=device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                    torch.manual_seed(seed)
                    with devices.autocast(self.config, device) if self.config is not None else contextlib.nullcontext():
                        generated = self.policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                         generation_config=generation)
                out.append([_completion(row[len(prompt):].tolist(), stop) for row in generated])
            return out
        finally:
            self.policy.train(training)

    def sync(self, model: torch.nn.Module, step: int) -> None:
        """Nothing to push: it generates with the policy itself."""

    def close(self) -> None:
        self.policy = None


def _completion(ids: list[int], stop: list[int]) -> Completion:
    """The generated ids up to and including the first stop token (generate pads after it)."""
    for i, token in enumerate(ids):
        if token in stop:
            return Completion(tuple(ids[:i + 1]), True)
    return Completion(tuple(ids), False)

