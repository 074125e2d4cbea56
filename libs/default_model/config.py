"""The build settings of the default model: architecture, tokenizer and pre-training hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata

# Special tokens, in id order: they are the first three entries of the vocabulary.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# The libraries whose numerics or file formats shape the built bytes.
BUILD_LIBRARIES = ("safetensors", "tokenizers", "torch", "transformers")


def library_versions() -> dict[str, str]:
    """Installed versions of BUILD_LIBRARIES, read without importing them (resolve stays cheap)."""
    return {name: metadata.version(name) for name in BUILD_LIBRARIES}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the default model (with the corpus and
    the builder's source, which the cache fingerprint also covers)."""

    # Architecture (LlamaForCausalLM, loaded as-is by vLLM's Llama implementation).
    vocab_size: int = field(default=3072, metadata={"help": "BPE vocabulary size, special tokens included"})
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Tied like Qwen2.5-0.5B: one matrix fewer to train in the short pre-training budget.
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    # Pre-training on the shipped corpus.
    max_steps: int = field(default=640, metadata={"help": "pre-training steps (the tests use a handful)"})
    # Small batches, many steps: on this corpus (~35k tokens a pass) more updates for the same
    # compute fitted the dialogues best (assistant-token loss 1.36 at 2x640 steps, 1.50 at 4x320).
    per_device_train_batch_size: int = 2
    max_length: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # Dialogues are a third of the text; seen twice per pass so the base model answers in the chat format.
    dialogue_repeats: int = 2
    seed: int = 42
    # One thread, whatever the host has: float sums split across threads change with the thread
    # count, and so would the weight bits. On a shared machine one thread is also faster than two:
    # OpenMP workers wait for each other at every op, and a descheduled one stalls both (measured
    # here under load: 0.4 s a step on one thread, 2-3.5 s on two).
    num_threads: int = 1

    def problems(self) -> list[str]:
        found = []
        if self.max_steps < 1:
            found.append(f"max_steps: must be at least 1, got {self.max_steps}")
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            found.append("hidden_size: must equal num_attention_heads * head_dim")
        if self.max_length > self.max_position_embeddings:
            found.append("max_length: must not exceed max_position_embeddings")
        return found
