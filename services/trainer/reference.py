"""The reference model of the methods that compare the policy with one (dpo, kto): its
forward, without gradients, on the same micro-batches as the policy.

- LoRA/QLoRA with no --ref_model: the policy's own weights with the adapter disabled (no
  second copy in memory); with --ref_adapters, those adapters on the base instead.
- full training, or --ref_model DIR: a frozen copy loaded from that directory.
"""

from __future__ import annotations

import torch


class Reference:
    """`forward(**inputs)` returns the reference's output for the policy's model inputs."""

    def __init__(self, config, policy_forward, policy, model_dir):
        self.shared = config.is_adapter and not config.ref_model and not config.ref_adapters
        if self.shared:
            self.policy_forward, self.policy = policy_forward, policy
            self.model = None
        else:
            self.model = load(config, config.ref_model or model_dir)

    def forward(self, **inputs):
        with torch.no_grad():
            if self.shared:  # the same weights, adapter off: one copy in memory
                with self.policy.disable_adapter():
                    return self.policy_forward(**inputs)
            return self.model(**inputs)


def load(config, model_dir):
    """A frozen reference from `model_dir` (with --ref_adapters applied), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, config.torch_dtype))
    for adapter in config.ref_adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return model
