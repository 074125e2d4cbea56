"""The label rules every prepared row must satisfy, shared by the template, layout
and fuzz tests: input_ids are apply_chat_template's own, and labels are the ones
the per-row path (every conversation prefix rendered, labels from every token's
offsets) gives, so that the fast paths are held to the definition."""

from __future__ import annotations

from services.dataprep import template
from services.dataprep.loss_scale import trained_messages
from services.dataprep.template import IGNORE_INDEX


def reference(tokenizer, messages, **kwargs) -> list[int]:
    """apply_chat_template's own token ids (a BatchEncoding in transformers 5, a list before)."""
    result = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(result["input_ids"] if not isinstance(result, list) else result)


def per_row(tokenizer, messages, losses, loss_scale, tools=None) -> tuple[list[int], list[int]] | None:
    """The slow path: every prefix rendered for this row, labels from all offsets;
    None where the template cannot be followed on this row."""
    text = template.render(tokenizer, messages, tools=tools)
    trained = trained_messages([m["role"] for m in messages], losses, loss_scale)
    try:
        spans = template.trained_spans(tokenizer, messages, text, trained, loss_scale == "all", tools)
    except template.TemplateError:
        return None
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, template.labels_from_spans(encoding.ids, encoding.offsets, spans)


def expected_sequence(tokenizer, messages, losses, loss_scale, tools=None, max_length=0,
                      truncation_strategy="delete") -> tuple[list[int], list[int]] | None:
    """What a kept sequence must be (its model-side messages, after tool_call turns
    are adapted): apply_chat_template's ids and the per-row path's labels, cut as
    --truncation_strategy cuts them; None where it must not be kept (too long to
    keep, or the per-row path cannot find its spans, or nothing trains)."""
    found = per_row(tokenizer, messages, losses, loss_scale, tools)
    if found is None:
        return None
    ids, labels = found
    assert ids == reference(tokenizer, messages, tools=tools)
    if not any(label != IGNORE_INDEX for label in labels):
        return None
    if max_length and len(ids) > max_length:
        if truncation_strategy not in ("left", "right"):
            return None
        cut = slice(-max_length, None) if truncation_strategy == "left" else slice(None, max_length)
        ids, labels = ids[cut], labels[cut]
        if not any(label != IGNORE_INDEX for label in labels):
            return None
    return ids, labels


def check_labels(input_ids, labels) -> None:
    """A label is its own token or IGNORE_INDEX, one per token, and something trains."""
    assert len(labels) == len(input_ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    assert any(label != IGNORE_INDEX for label in labels), "a kept row with nothing to train"
