"""Rollouts: how an online method gets completions of its prompts (base.Generator), by
transformers generate with the policy itself or by a vLLM engine (colocated in the trainer,
or TuneForge's serving service), picked by --use_vllm / --vllm_mode."""

from __future__ import annotations

import importlib
import json
import pathlib

from services.trainer.rollout.base import Generator


def build(config, model_dir, tokenizer, world, policy) -> Generator:
    """The generator of this job's rollouts on this rank (`policy`: the unwrapped policy, which
    transformers generation samples from directly). The vLLM generators are imported only when
    asked for (vLLM is heavy and optional here)."""
    lora_rank = config.lora_rank if config.is_adapter else None
    if not config.use_vllm:
        from services.trainer.rollout.transformers import TransformersGenerator

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return TransformersGenerator(policy, pad_id, config)
    if config.vllm_mode == "colocate":
        module = importlib.import_module("services.trainer.rollout.vllm_colocate")
        return module.ColocateGenerator(str(model_dir), lora_rank=lora_rank, max_model_len=max_model_len(model_dir),
                                        seed=config.seed, merge_lora=merges_lora(config))
    module = importlib.import_module("services.trainer.rollout.vllm_server")
    return module.ServerGenerator(address=f"{config.vllm_server_host}:{config.vllm_server_port}",
                                  job=adapter_name(config), base_model=str(model_dir), lora_rank=lora_rank)


def merges_lora(config) -> bool:
    """Whether a colocated engine gets the LoRA policy merged into its weights (--vllm_enable_lora
    false; unset: for lora, as TRL and ms-swift do) rather than as an adapter. Measured on this
    CPU (default model, one rollout of 2 prompts x 8 x 128 tokens): 0.18-0.24 s merged against
    0.55-0.67 s as an adapter, the sync 0.02 s either way. A qlora base is 4-bit: adapter only."""
    return config.train_type == "lora" and config.vllm_enable_lora is not True


def adapter_name(config) -> str:
    """The job-scoped name its policy's adapter takes on the serving service while it trains
    (each sync a new version replacing the previous), apart from the names it publishes under."""
    return f"{config.resolved_adapter_name()}-rollout"


def max_model_len(model_dir) -> int:
    """The longest prompt + completion a colocated engine must hold: the model's context."""
    values = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    return int(values.get("max_position_embeddings") or values.get("n_positions") or 2048)
