"""The reference model of the methods that compare the policy with one (dpo, kto): its
forward, without gradients, on the same micro-batches as the policy.

- LoRA/QLoRA with no --ref_model: the policy's own weights with the adapter disabled (no
  second copy in memory); with --ref_adapters, those adapters on the base instead.
- full training, or --ref_model DIR: a frozen copy loaded from that directory, in
  torch_dtype (it never takes an update) on the policy's device, run under the same autocast;
  sharded as the policy under FSDP2 and ZeRO-3, whole on every rank under DDP and ZeRO-2
  (services.trainer.distributed.frozen).
"""

from __future__ import annotations

import torch

from services.trainer import devices, distributed


class Reference:
    """`forward(**inputs)` returns the reference's output for the policy's model inputs."""

    def __init__(self, config, policy_forward, policy, model_dir):
        self.shared = config.is_adapter and not config.ref_model and not config.ref_adapters
        if self.shared:
            self.policy_forward, self.policy = policy_forward, policy
            self.model = None
        else:
            self.config, self.device = config, next(policy.parameters()).device
            world = distributed.world_from_env()  # the process group is joined before any method exists
            model = load(config, config.ref_model or model_dir).to(self.device)
            self.model = distributed.frozen(model, config, world)

    def forward(self, **inputs):
        with torch.no_grad():
            if self.shared:  # the same weights, adapter off: one copy in memory
                with self.policy.disable_adapter():
                    return self.policy_forward(**inputs)
            with devices.autocast(self.config, self.device):
                return self.model(**devices.to_device(inputs, self.device))


def load(config, model_dir, adapters: list[str] | None = None):
    """A frozen reference from `model_dir` (with `adapters` applied: --ref_adapters unless given;
    gkd's teacher passes its own), in eval mode, whole."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": config.attn_impl} if config.attn_impl else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=devices.compute_dtype(config), **extra)
    for adapter in config.ref_adapters if adapters is None else adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return model
