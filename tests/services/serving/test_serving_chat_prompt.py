"""Rendering a chat request's messages with the model's chat template (engine.render_chat), on
the default model's real tokenizer: a template that fails on what a request carries is the
client's 400 naming `messages`, never a 500, whatever the template raises."""

from __future__ import annotations

import pytest

from libs.common.errors import FailedPrecondition, InvalidArgument
from services.serving.engine import render_chat


@pytest.fixture()
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def test_the_default_template_renders_and_ends_in_the_assistant_turn(tokenizer, default_model):
    ids = render_chat(tokenizer, [{"role": "user", "content": "hi"}], default_model)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("template, message, error", [
    # Templates refuse what they cannot render with raise_exception: a jinja2 TemplateError.
    ("{{ raise_exception('roles must alternate') }}", {"role": "user", "content": "hi"},
     "the chat template refused the messages: roles must alternate"),
    # Templates index into any field a message carries (extra fields pass through): a TypeError was a 500.
    ("{% for m in messages %}{{ m['weight'] + 1 }}{% endfor %}", {"role": "user", "content": "hi", "weight": "x"},
     'the chat template could not render the messages: TypeError: can only concatenate str (not "int") to str'),
    ("{% for m in messages %}{% for c in m['tool_calls'] %}{{ c }}{% endfor %}{% endfor %}",
     {"role": "assistant", "content": "", "tool_calls": 5},
     "the chat template could not render the messages: TypeError: 'int' object is not iterable"),
])
def test_a_template_that_fails_on_the_messages_is_invalid_argument(tokenizer, default_model, template, message, error):
    tokenizer.chat_template = template
    with pytest.raises(InvalidArgument) as info:
        render_chat(tokenizer, [message], default_model)
    assert (info.value.field, info.value.message) == ("messages", error)


def test_a_model_without_a_template_is_a_failed_precondition(tokenizer, default_model):
    tokenizer.chat_template = None
    with pytest.raises(FailedPrecondition, match="has no chat template"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], default_model)
