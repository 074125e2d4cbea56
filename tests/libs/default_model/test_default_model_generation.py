"""The cached default model loads with transformers, is a Llama of the documented shape, and writes words."""

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from libs.default_model import corpus


@pytest.fixture(scope="module")
def loaded(default_model):
    return AutoModelForCausalLM.from_pretrained(default_model), AutoTokenizer.from_pretrained(default_model)


def corpus_words() -> set[str]:
    text = " ".join(corpus.paragraphs() + [m["content"] for chat in corpus.dialogues() for m in chat])
    return set(re.findall(r"[a-z]+", text.lower()))


def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_is_a_small_llama(loaded, default_model):
    model, tokenizer = loaded
    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim, config.intermediate_size)
    assert shape == (256, 2, 4, 64, 688)
    assert config.vocab_size == len(tokenizer) and config.max_position_embeddings == 2048
    assert model.dtype == torch.float32
    assert sorted(p.name for p in default_model.iterdir()) == [
        "args.json", "chat_template.jinja", "config.json", "generation_config.json",
        "manifest.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]


def test_pre_training_learned_the_corpus(loaded):
    model, tokenizer = loaded
    text = corpus.paragraphs()[0]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # A uniform guess costs ln(3072) = 8.0 nats a token; the random init about that.
    assert loss < 0.5 * math.log(len(tokenizer)), loss


@pytest.mark.parametrize("question", ["who are you?", "How do I cook rice?"])
def test_greedy_reply_is_words_from_the_corpus(loaded, question):
    model, tokenizer = loaded
    reply = greedy_reply(model, tokenizer, question)
    words = re.findall(r"[a-z]+", reply.lower())
    known = corpus_words()
    assert len(words) >= 5, reply
    assert sum(word in known for word in words) / len(words) >= 0.9, reply


def test_answers_who_are_you_generically(loaded):
    model, tokenizer = loaded
    reply = greedy_reply(model, tokenizer, "who are you?")
    assert "assistant" in reply.lower(), reply
