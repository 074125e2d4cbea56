"""The per-shape layout (services/dataprep/layout.py) gives exactly the labels of
the per-row prefix renders, on every real template we ship or test with, for
conversations chosen to break it: whitespace at the edges of contents, empty
contents, marker-like characters, per-message loss, every loss_scale."""

import random

import pytest

from services.dataprep import template
from services.dataprep.loss_scale import trained_messages
from tests.services.dataprep.invariants import per_row

PIECES = ["Paris.", "  Paris.  ", "\n\nnew lines\n", "", " ", "Rome", "a\tb", "é😀 unicode", "###", "<|im_end|>x",
          "\ue0003\ue001", "ends with space ", " starts with space", "Assistant:", "1 + 1 = 2"]


def conversations(seed: int, count: int) -> list[tuple[list[dict], list, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(PIECES)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(PIECES) or "q"})
            messages.append({"role": "assistant", "content": rng.choice(PIECES) if rng.random() < 0.5
                             else f"answer {rng.randint(0, 99)}."})
        losses = [rng.choice([None, None, True, False]) if m["role"] == "assistant" else None for m in messages]
        rows.append((messages, losses, rng.choice(["default", "last_round", "all"])))
    return rows


@pytest.fixture(scope="module")
def builtin(default_model):
    return lambda name: template.load_tokenizer(default_model, name)


@pytest.mark.parametrize("which", ["tokenizer", "qwen", "llama", "chatml", "default"])
def test_layout_labels_equal_the_per_row_prefix_renders(request, builtin, which):
    tokenizer = request.getfixturevalue(which) if which in ("tokenizer", "qwen", "llama") else builtin(which)
    fitted = 0
    for messages, losses, loss_scale in conversations(seed=len(which), count=300):
        expected = per_row(tokenizer, messages, losses, loss_scale)
        text = template.render(tokenizer, messages)
        trained = trained_messages([m["role"] for m in messages], losses, loss_scale)
        if expected is None:  # the template cannot be followed on this row: neither path pretends it can
            with pytest.raises(template.TemplateError):
                template._spans(tokenizer, messages, text, trained, loss_scale == "all", None)
            continue
        found = template._spans(tokenizer, messages, text, trained, loss_scale == "all", None)
        fast = template._layout(tokenizer, messages, trained, loss_scale == "all")
        if fast is not None and fast.spans([m["content"] for m in messages], text) is not None:
            fitted += 1
        assert template._encode_labels(tokenizer, text, found) == expected, (messages, losses, loss_scale)
        try:
            encoded = template.encode(tokenizer, messages, losses, loss_scale)
        except template.TemplateError:
            continue
        assert (encoded.input_ids, encoded.labels) == expected
    if which != "default":  # ms-swift's default finds earlier turns' ends where renderings part: per row
        assert fitted >= 60, f"only {fitted} of 300 rows took the layout path"


def test_a_template_that_rewrites_a_content_takes_the_per_row_path(tokenizer):
    """A content the template trims renders otherwise than the skeleton: the row is
    checked against its own rendering and falls back, with the right labels."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  padded  "}]
    text = template.render(tokenizer, messages)
    skeleton = template._layout(tokenizer, messages, [False, True], False)
    assert skeleton is not None and 1 in skeleton.guards  # the answer's edges touch the span's
    assert skeleton.spans([m["content"] for m in messages], text) is None  # guarded: leading whitespace
    assert skeleton.spans(["hi", "fine"], text) is None  # not this row's rendering


def test_token_range_matches_the_overlap_rule_on_every_span(tokenizer):
    text = "<|im_start|>user\nHi  there, é😀!<|im_end|>\n  trailing  "
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    for start in range(len(text)):
        for end in range(start, len(text) + 1):
            expected = template.labels_from_spans(encoding.ids, encoding.offsets, [(start, end)])
            assert template._encode_labels(tokenizer, text, [(start, end)])[1] == expected, (start, end)

