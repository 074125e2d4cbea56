"""The default model's tokenizer: ChatML rendered exactly, special tokens, byte-level round trips."""

import json

import pytest
from transformers import AutoTokenizer

from libs.default_model import corpus

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def test_chat_template_adds_the_default_system_prompt_and_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "who are you?"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nwho are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_keeps_a_given_system_prompt_and_every_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!\nHow can I help?<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )


def test_chat_template_takes_openai_content_parts(tokenizer):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    assert text == SYSTEM + "<|im_start|>user\nfirst\nsecond<|im_end|>\n"


def test_special_tokens_are_single_ids(tokenizer, default_model):
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[0] == 1  # no BOS before the first <|im_start|>
    assert ids.count(1) == 3 and ids.count(2) == 2
    generation = json.loads((default_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


@pytest.mark.parametrize("text", ["héllo wörld 😀 \t\n  x", "def f(x):\n    return x ** 2  # \u00e9\u4e2d", "   leading and trailing   "])
def test_any_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_vocabulary_holds_whole_corpus_words(tokenizer):
    assert len(tokenizer) == 3072
    # Frequent words are single tokens, so the model writes words rather than letters.
    for word in (" the", " assistant", " computer", " water", " helpful"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    sample = " ".join(corpus.paragraphs()[:20])
    assert len(sample) / len(tokenizer(sample)["input_ids"]) > 3.5  # characters per token
