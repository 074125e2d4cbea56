"""Chat-template tokenization and the assistant label mask, on the default model."""

import copy

import pytest

from services.dataprep import template
from services.dataprep.template import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_labels_train_exactly_each_answer_and_its_im_end(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The default model's ChatML conversation, cut where training starts and stops.
    prompt_1 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                "<|im_start|>assistant\n")
    answer_1 = "The capital of France is Paris."
    prompt_2 = "\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
    answer_2 = "Rome."
    tail = "\n"
    assert template.render(tokenizer, CONVERSATION) == \
        prompt_1 + answer_1 + "<|im_end|>" + prompt_2 + answer_2 + "<|im_end|>" + tail

    p1, a1, p2, a2, t = (ids(tokenizer, s) for s in (prompt_1, answer_1, prompt_2, answer_2, tail))
    expected_ids = p1 + a1 + [im_end] + p2 + a2 + [im_end] + t
    expected_labels = ([IGNORE_INDEX] * len(p1) + a1 + [im_end]
                       + [IGNORE_INDEX] * len(p2) + a2 + [im_end]
                       + [IGNORE_INDEX] * len(t))

    encoded = template.encode(tokenizer, CONVERSATION)

    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels
    assert encoded.trained_tokens == len(a1) + len(a2) + 2
    trained = [tokenizer.convert_ids_to_tokens(i) for i in encoded.labels if i != IGNORE_INDEX]
    assert trained[len(a1)] == "<|im_end|>" and trained[-1] == "<|im_end|>"
    assert tokenizer.decode([i for i in encoded.labels if i != IGNORE_INDEX]) == \
        answer_1 + "<|im_end|>" + answer_2 + "<|im_end|>"


def test_input_ids_equal_apply_chat_template(tokenizer):
    conversations = [
        CONVERSATION,
        CONVERSATION[1:3],
        [{"role": "user", "content": "héllo 👋 naïve"}, {"role": "assistant", "content": "ça va ✓"}],
        [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": "\n\nnewlines\n\n"}],
    ]
    for messages in conversations:
        result = tokenizer.apply_chat_template(messages, tokenize=True)
        reference = result if isinstance(result, list) else list(result["input_ids"])
        encoded = template.encode(tokenizer, messages)
        assert encoded.input_ids == reference
        assert len(encoded.labels) == len(reference)


def test_answer_whitespace_is_trained_but_newline_after_end_of_turn_is_not(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok\n\n"}]
    encoded = template.encode(tokenizer, messages)
    trained = [i for i in encoded.labels if i != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "ok\n\n<|im_end|>"
    assert encoded.labels[-1] == IGNORE_INDEX  # the "\n" the template puts after <|im_end|>


def test_spans_come_from_the_template_not_from_chatml(tokenizer):
    """A different template (end-of-turn marker `</s>`-like eos, no role headers):
    the same code trains its answers and end markers."""
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A:\n{{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:\n{% endif %}")
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}]
    encoded = template.encode(custom, messages)
    trained = [i for i in encoded.labels if i != IGNORE_INDEX]
    assert custom.decode(trained) == "two<|endoftext|>four<|endoftext|>"


def test_template_that_rewrites_earlier_turns_is_a_template_error(tokenizer):
    """Templates that render earlier turns differently once later ones exist (here:
    only the last user turn is shown) cannot be masked by prefix; the row is refused."""
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' or loop.last %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    with pytest.raises(template.TemplateError, match="prefix") as error:
        template.encode(custom, messages)
    assert error.value.field == "messages[1]"


def test_template_refusal_is_a_template_error(tokenizer):
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(template.TemplateError, match="roles must alternate"):
        template.encode(custom, [{"role": "assistant", "content": "x"}])


def test_labels_from_spans_overlap_rule():
    input_ids = [10, 11, 12, 13, 14]
    offsets = [(0, 3), (3, 5), (5, 9), (9, 10), (10, 12)]
    # span [4, 10): token 1 straddles its start, token 3 ends at its end, token 4 is outside
    assert template.labels_from_spans(input_ids, offsets, [(4, 10)]) == [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX]
    assert template.labels_from_spans(input_ids, offsets, [(0, 3), (10, 12)]) == [10, IGNORE_INDEX, IGNORE_INDEX,
                                                                                  IGNORE_INDEX, 14]
    assert template.labels_from_spans(input_ids, offsets, [(5, 5)]) == [IGNORE_INDEX] * 5


def test_fingerprints_are_sha256_of_template_text_and_tokenizer_json(tokenizer, default_model):
    import hashlib

    assert template.template_fingerprint(tokenizer) == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    assert template.tokenizer_fingerprint(default_model, tokenizer) == \
        hashlib.sha256((default_model / "tokenizer.json").read_bytes()).hexdigest()


OPENING_ANSWER = [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "hm"},
                  {"role": "assistant", "content": "ok"}]


def test_an_opening_answer_trains_from_where_its_content_starts(tokenizer):
    """A conversation that opens with an answer (ms-swift's pre-training rows, a
    greeting) is the template's rendering, its answers trained: transformers renders
    no empty conversation, so the first answer's start is where the template's
    preamble ends (issue 12: this row stopped a whole preparation with
    `ValueError: Cannot apply chat template to an empty conversation`)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    preamble = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\n"
    middle = "\n<|im_start|>user\nhm<|im_end|>\n<|im_start|>assistant\n"
    p, a1, m, a2, t = (ids(tokenizer, s) for s in (preamble, "I start", middle, "ok", "\n"))
    encoded = template.encode(tokenizer, OPENING_ANSWER)
    assert encoded.input_ids == p + a1 + [im_end] + m + a2 + [im_end] + t
    assert encoded.input_ids == list(tokenizer.apply_chat_template(OPENING_ANSWER, tokenize=True)["input_ids"])
    assert encoded.labels == ([IGNORE_INDEX] * len(p) + a1 + [im_end] + [IGNORE_INDEX] * len(m) + a2 + [im_end]
                              + [IGNORE_INDEX] * len(t))
    alone = template.encode(tokenizer, OPENING_ANSWER[:1])  # `text` alone: one assistant turn
    assert alone.labels == [IGNORE_INDEX] * len(p) + a1 + [im_end] + [IGNORE_INDEX] * len(t)


@pytest.mark.parametrize("content", ["I start", "  I start  "])  # the layout path; the per-row path (guarded edges)
def test_an_opening_answer_takes_the_layout_or_the_per_row_path_alike(tokenizer, content):
    messages = [{**OPENING_ANSWER[0], "content": content}, *OPENING_ANSWER[1:]]
    text = template.render(tokenizer, messages)
    trained = [True, False, True]
    per_row = template.trained_spans(tokenizer, messages, text, trained, everything=False)
    found = template._layout(tokenizer, messages, trained, False)
    assert found is not None
    assert found.spans([m["content"] for m in messages], text) == (per_row if content == "I start" else None)
    assert template._spans(tokenizer, messages, text, trained, False, None) == per_row
    assert text[per_row[0][0]:per_row[0][1]] == content + "<|im_end|>"


def test_every_error_of_apply_chat_template_is_a_template_error(tokenizer):
    """Not only Jinja's own refusals: what a row's values make the template raise
    (here a string added to a number) is that row's reject, not a crash."""
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = "{% for m in messages %}{{ m['role'] + m['n'] }}{% endfor %}"
    with pytest.raises(template.TemplateError, match="cannot render the conversation: TypeError") as error:
        template.render(custom, [{"role": "user", "content": "x", "n": 1}])
    assert error.value.field == "messages"
    with pytest.raises(template.TemplateError, match="empty conversation"):
        template.render(custom, [])
