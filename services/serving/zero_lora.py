"""A zero LoRA adapter for a base model (B = 0, so the model's output is exactly the
base model's): what base-model requests run with on engines whose LoRA ops
cannot mix base rows and adapter rows in one batch (see Engine.start)."""

from __future__ import annotations

import json
import pathlib

from libs.common import disk

# Modules vLLM can put a LoRA on, most common first (Llama/Qwen/Mistral names, then fused ones).
TARGETS = ("q_proj", "o_proj", "down_proj", "qkv_proj", "dense")


def _weight_shapes(model_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                shapes[name] = tuple(reader.get_slice(name).get_shape())
    return shapes


def write(model_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path | None:
    """Writes a rank-1 zero adapter on one linear module of `model_dir` into `out`
    (PEFT's layout); None when no module vLLM can adapt is found."""
    import torch
    from safetensors.torch import save_file

    shapes = _weight_shapes(model_dir)
    for target in TARGETS:
        name = next((n for n in sorted(shapes) if n.endswith(f".{target}.weight") and len(shapes[n]) == 2), None)
        if name is not None:
            break
    else:
        return None
    module = name.removesuffix(".weight")
    out_features, in_features = shapes[name]
    with disk.writing(out, context="writing the base model's zero adapter"):  # DiskFull, not a traceback at start
        out.mkdir(parents=True, exist_ok=True)
        save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(1, in_features),
                   f"base_model.model.{module}.lora_B.weight": torch.zeros(out_features, 1)},
                  str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [target], "bias": "none",
            "base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}))
    return out
