"""What several benchmarks build the same way: a random-init Llama with the default model's
tokenizer, and text cut from the default model's corpus. Imported by the scripts in this folder
(run as `python bench/<script>.py`, which puts bench/ on the import path)."""

from __future__ import annotations

import json
import pathlib
import random
from typing import Callable


def random_llama(out: pathlib.Path, shape: dict) -> int:
    """A random-init Llama of `shape` (LlamaConfig fields) with the default model's tokenizer and
    chat template, saved in `out`; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from libs.default_model.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **shape)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def excerpts(rng: random.Random) -> Callable[[int], str]:
    """text(n): n consecutive words from a random place in the default model's corpus."""
    from libs.default_model import corpus

    words = " ".join(corpus.paragraphs()).split()

    def text(n: int) -> str:
        start = rng.randrange(0, len(words) - n)
        return " ".join(words[start:start + n])

    return text


def write_conversations(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    """Conversations of varied length (about 40 to 700 tokens) cut from the default model's corpus."""
    rng = random.Random(seed)
    text = excerpts(rng)
    with open(path, "w") as f:
        for _ in range(rows):
            turns = [{"role": "user", "content": text(rng.randint(5, 60))},
                     {"role": "assistant", "content": text(rng.choice([20, 60, 120, 250, 400]))}]
            f.write(json.dumps({"messages": turns}) + "\n")


def random_loras(model_dir: pathlib.Path, root: pathlib.Path, names: list[str], rank: int = 8) -> dict[str, pathlib.Path]:
    """PEFT LoRAs (all-linear) on `model_dir` whose B is random (PEFT starts B at zero, which
    would equal the base), one per name, seeded by position (A and B); published with args.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from libs.common import checkpoint

    paths = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)  # PEFT draws lora_A from torch's global generator
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)

        def fill(tmp: pathlib.Path, model=model) -> None:
            model.save_pretrained(tmp)
            (tmp / "args.json").write_text(json.dumps({"model": str(model_dir), "lora_rank": rank}))

        paths[name] = checkpoint.publish(root / name / "checkpoint-1", fill)
    return paths
