"""The default model's build recipe: train the tokenizer, initialise the Llama, pre-train it, save a Hugging Face directory.

The same source, corpus and settings give byte-identical files: fixed seeds, a fixed
thread count, a seeded data order and no timestamps anywhere in the output.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from dataclasses import asdict

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from libs.common.checkpoint import publish
from libs.common.config import validate
from libs.common.errors import FailedPrecondition
from libs.default_model import corpus
from libs.default_model.config import ENDOFTEXT, IM_END, BuildConfig, library_versions
from libs.default_model.pretrain import pretrain
from libs.default_model.tokenizer import build_tokenizer

ARGS_FILE = "args.json"


def llama_config(config: BuildConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        bos_token_id=None,  # like Qwen's chat models: nothing is prepended to a prompt
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        dtype="float32",
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Generation stops at the end of an assistant turn or of a plain document; sampling
    settings are left to the caller (no defaults that would override a request's)."""
    return GenerationConfig(
        bos_token_id=None,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )


@contextlib.contextmanager
def deterministic(config: BuildConfig) -> Iterator[None]:
    """Fixed seed and thread count for the build, restoring the caller's afterwards: the build
    may run inside a service process or a test session that has its own settings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            yield
    finally:
        torch.set_num_threads(threads)


def build_into(directory: pathlib.Path, config: BuildConfig) -> list[float]:
    """Fills `directory` with the model; returns the pre-training loss of every step."""
    validate(config)
    with deterministic(config):
        tokenizer = build_tokenizer(config)
        model = LlamaForCausalLM(llama_config(config, tokenizer))
        documents = corpus.documents(
            lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
            config.dialogue_repeats,
            ENDOFTEXT,
        )
        token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
        losses = pretrain(model, token_ids, config)
        model.generation_config = generation_config(tokenizer)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    # safetensors is written through a private temp file (mode 0600); the cache may be shared.
    for path in directory.iterdir():
        path.chmod(0o644)
    # No git revision or time here, unlike a trainer's args.json: the same inputs must give the same bytes.
    args = {
        "build_config": asdict(config),
        "versions": library_versions(),
        "corpus_tokens": sum(map(len, token_ids)),
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
    }
    (directory / ARGS_FILE).write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
    return losses


def build(output_dir: str | pathlib.Path, config: BuildConfig = BuildConfig()) -> pathlib.Path:
    """Builds the model into `output_dir` (new or empty), published atomically with a manifest."""
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FailedPrecondition(f"{output_dir} already exists and is not empty; give a new directory", field="output_dir")
    return publish(output_dir, lambda tmp: build_into(tmp, config))
