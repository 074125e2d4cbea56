"""The default model's tokenizer: a byte-level BPE trained on the shipped corpus, with the ChatML chat template."""

from __future__ import annotations

import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from libs.default_model import corpus
from libs.default_model.config import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS, BuildConfig

CHAT_TEMPLATE_FILE = pathlib.Path(__file__).parent / "chat_template.jinja"


def chat_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


def train_bpe(config: BuildConfig) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, so any text round-trips) with the special tokens
    as ids 0, 1, 2. The trainer breaks count ties by symbol order, so the result is deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.tokenizer_texts(), trainer)
    return tokenizer


def build_tokenizer(config: BuildConfig) -> PreTrainedTokenizerFast:
    """The Hugging Face tokenizer saved beside the model: eos `<|im_end|>` (what ends an assistant
    turn), pad `<|endoftext|>`, no BOS, `<|im_start|>` special too (so decoding with
    skip_special_tokens drops it), and the ChatML template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(config),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        chat_template=chat_template(),
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
