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


TOOLS_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }}:{{ t['function']['parameters'] "
                  "| tojson }};{% endfor %}</tools>{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_tools_reach_the_template_as_apply_chat_template_takes_them(tokenizer, default_model):
    # The default model's template ignores tools; one that renders them (the tool-calling templates) gets
    # exactly what `apply_chat_template(tools=...)` passes, as dataprep renders tools for training.
    tokenizer.chat_template = TOOLS_TEMPLATE
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    ids = render_chat(tokenizer, messages, default_model, tools)
    assert tokenizer.decode(ids) == '<tools>get_weather:{"type": "object"};</tools>hi'
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                                 add_generation_prompt=True), add_special_tokens=False)
    assert tokenizer.decode(render_chat(tokenizer, messages, default_model)) == "hi"
