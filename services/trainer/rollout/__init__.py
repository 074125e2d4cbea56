"""Rollouts: how an online method gets completions of its prompts (base.Generator), by
transformers generate with the policy itself or by a vLLM engine (colocated in the trainer,
or TuneForge's serving service), picked by --use_vllm / --vllm_mode."""
