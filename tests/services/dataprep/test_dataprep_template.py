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
