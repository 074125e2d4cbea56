"""The model a job trains: the base loaded onto the rank's device in its load dtype (float32
for full training, whose weights are the float32 masters; `torch_dtype` for a frozen base
under adapters; 4-bit nf4 through bitsandbytes for qlora, computing in torch_dtype) with
`--attn_impl`'s attention, its vocabulary fitted to `--tokenizer` (services/trainer/vocabulary.py), with the head its method needs (a causal LM's, or a reward model's classification
head), every weight trainable for `full`, else frozen under fresh PEFT LoRA adapters on
`target_modules` (plus `modules_to_save` trained whole) or under the adapter given with
`--adapters` (its weights and its own LoRA config), with gradient checkpointing on request."""

from __future__ import annotations

import torch

from libs.common.errors import InvalidArgument
from services.trainer import devices, vocabulary
from services.trainer.config import TrainConfig


def quantization_config(config: TrainConfig):
    """bitsandbytes' 4-bit nf4 config for qlora (None otherwise). Matmuls run in torch_dtype
    (float32 when it is float32);
    the nested (double) quantization of the scales saves ~0.4 bit a weight, as QLoRA does."""
    if config.train_type != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, config.torch_dtype))


def build_model(config: TrainConfig, model_dir, auto_class=None, task_type: str = "CAUSAL_LM", **model_kwargs):
    """The model to train from `model_dir`, loaded onto this rank's device (devices.rank_device:
    straight onto the GPU when it trains on one, so no host copy of a large model is made).
    `auto_class` (AutoModelForCausalLM unless given) picks the head, `task_type` the PEFT
    model around it (SEQ_CLS trains the classification head whole beside the adapter), and
    `model_kwargs` go to from_pretrained (the reward model's num_labels=1)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(config)
    extra = {"quantization_config": quantization, **model_kwargs}
    device = devices.rank_device(config)
    if device.type == "cuda":
        extra["device_map"] = {"": device}
    if config.attn_impl:
        extra["attn_implementation"] = config.attn_impl
    auto_class = auto_class or AutoModelForCausalLM
    base = auto_class.from_pretrained(model_dir, dtype=devices.load_dtype(config), **extra)
    if config.tokenizer:  # an extended vocabulary: rows for the new tokens before any adapter goes on
        vocabulary.fit(base, len(vocabulary.load(config.tokenizer, model_dir)))
    checkpointing = {"use_reentrant": False}  # works with frozen inputs (no enable_input_require_grads)
    if config.train_type == "full":
        base.requires_grad_(True)
        if config.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        return base
    if quantization is not None:
        # freezes the base and keeps norms in float32; checkpointing only when asked
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=checkpointing)
    elif config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if config.adapters:  # continue an adapter (ms-swift's --adapters): its weights, and its LoRA config
        from peft import PeftModel

        return PeftModel.from_pretrained(base, config.adapters[0], is_trainable=True)
    targets = "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, modules_to_save=list(config.modules_to_save) or None,
                      task_type=task_type)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in config.modules_to_save if m not in names]
    if missing:
        raise InvalidArgument(f"the model has no module named {', '.join(missing)}", field="modules_to_save")
    try:
        return get_peft_model(base, lora)
    except ValueError as exc:  # peft's message for target modules the base does not have
        raise InvalidArgument(str(exc), field="target_modules") from exc


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward computes logits only for its last `logits_to_keep`
    positions (transformers' causal LMs; under PEFT, its base model's forward)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
