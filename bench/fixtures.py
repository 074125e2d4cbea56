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
