"""Loss masks token by token: --loss_scale, per-message loss, tool turns, the
system prompt priority and --truncation_strategy, on the default model's ChatML."""

import json

import pyarrow as pa
import pytest

from libs.common.errors import InvalidArgument
from services.dataprep import loss_scale, template
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare

SYSTEM = ["<|im_start|>", "system", "\n", "You", " are", " a", " helpful", " assistant", ".", "<|im_end|>", "\n"]
USER_HI = ["<|im_start|>", "user", "\n", "h", "i", "<|im_end|>", "\n"]
# a tool result is a user-side <tool_response> block (Qwen2.5's rendering, which vLLM's hermes parser expects)
TOOL_42 = ["<|im_start|>", "user", "\n", "<", "t", "oo", "l", "_", "res", "p", "on", "se", ">", "\n", "4", "2", "\n",
           "<", "/", "t", "oo", "l", "_", "res", "p", "on", "se", ">", "<|im_end|>", "\n"]
ASSISTANT = ["<|im_start|>", "assistant", "\n"]
AGENT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
         {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]


def spelled(tokenizer, encoded):
    """Each token as text; a trained one (label == its id) prefixed with '+'."""
    out = []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        assert label in (token, template.IGNORE_INDEX)
        out.append(("+" if label == token else "") + tokenizer.decode([token]))
    return out


def plus(tokens):
    return ["+" + t for t in tokens]


@pytest.mark.parametrize("roles, losses, scale, expected", [
    (["system", "user", "assistant", "user", "assistant"], [None] * 5, "default", [False, False, True, False, True]),
    (["system", "user", "assistant", "user", "assistant"], [None] * 5, "last_round",
     [False, False, False, False, True]),
    (["system", "user", "assistant", "user", "assistant"], [None] * 5, "all", [True] * 5),
    (["user", "assistant", "tool", "assistant"], [None] * 4, "all", [True, True, False, True]),
    (["user", "assistant", "tool", "assistant"], [None] * 4, "last_round", [False, True, False, True]),
    (["user", "assistant", "user", "assistant"], [None, None, True, False], "default", [False, True, True, False]),
    (["user", "assistant", "user", "assistant"], [None, True, None, None], "last_round", [False, True, False, True]),
    (["user", "assistant"], [False, None], "all", [False, True]),
])
def test_trained_messages(roles, losses, scale, expected):
    assert loss_scale.trained_messages(roles, losses, scale) == expected


def test_default_trains_every_assistant_turn_and_never_the_tool_turn(tokenizer):
    encoded = template.encode(tokenizer, AGENT)
    assert encoded.input_ids == template.template_ids(tokenizer, AGENT)
    assert spelled(tokenizer, encoded) == [*SYSTEM, *USER_HI, *ASSISTANT, "+y", "+o", "+<|im_end|>", "\n",
                                           *TOOL_42, *ASSISTANT, "+o", "+k", "+<|im_end|>", "\n"]


def test_last_round_trains_only_the_answers_after_the_last_user_turn(tokenizer):
    messages = [*AGENT, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    encoded = template.encode(tokenizer, messages, loss_scale="last_round")
    assert spelled(tokenizer, encoded) == [*SYSTEM, *USER_HI, *ASSISTANT, "y", "o", "<|im_end|>", "\n",
                                           *TOOL_42, *ASSISTANT, "o", "k", "<|im_end|>", "\n",
                                           *USER_HI, *ASSISTANT, "+o", "+k", "+<|im_end|>", "\n"]


def test_all_trains_every_token_but_the_tool_turn(tokenizer):
    encoded = template.encode(tokenizer, AGENT, loss_scale="all")
    assert spelled(tokenizer, encoded) == [*plus(SYSTEM), *plus(USER_HI), *plus(ASSISTANT), "+y", "+o",
                                           "+<|im_end|>", "+\n", *TOOL_42, *plus(ASSISTANT), "+o", "+k",
                                           "+<|im_end|>", "+\n"]


def test_per_message_loss_wins_over_loss_scale(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    encoded = template.encode(tokenizer, messages, losses=[None, False, True, None])
    # a trained user turn trains whole, through its end-of-turn marker
    assert spelled(tokenizer, encoded) == [*SYSTEM, *USER_HI, *ASSISTANT, "y", "o", "<|im_end|>", "\n",
                                           *plus(USER_HI[:-1]), "\n", *ASSISTANT, "+o", "+k", "+<|im_end|>", "\n"]
    everything = template.encode(tokenizer, messages, losses=[None, False, None, None], loss_scale="all")
    assert spelled(tokenizer, everything) == [*plus(SYSTEM), *plus(USER_HI), *ASSISTANT, "y", "o", "<|im_end|>",
                                              "\n", *plus(USER_HI), *plus(ASSISTANT), "+o", "+k", "+<|im_end|>", "+\n"]


def read_rows(out):
    tables = [pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in sorted(out.glob("shard-*.arrow"))]
    return [row for table in tables for row in table.to_pylist()]


def test_pipeline_applies_loss_scale_and_message_loss_and_rejects_rows_with_nothing_to_train(
        tmp_path, write_jsonl, tokenizer):
    untrainable = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "loss": False}]}
    tool_trained = {"messages": [*AGENT[:2], {"role": "tool", "content": "42", "loss": True}, AGENT[3]]}
    data = write_jsonl("d.jsonl", [{"messages": AGENT}, untrainable, tool_trained])
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out")))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (3, 1, 2)
    assert manifest["rejected_by_reason"] == {"invalid_messages": 1, "no_trainable": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [
        (2, "messages", "no_trainable"), (3, "messages[2].loss", "invalid_messages")]
    (row,) = read_rows(tmp_path / "out")
    expected = template.encode(tokenizer, AGENT)
    assert (row["input_ids"], row["labels"]) == (expected.input_ids, expected.labels)

    # under `all` the prompt of the second row trains, its answer (loss false) does not
    everything = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "all"), loss_scale="all"))
    assert (everything["rows_out"], everything["rejected_by_reason"]) == (2, {"invalid_messages": 1})
    first, second = read_rows(tmp_path / "all")
    assert first["labels"] == template.encode(tokenizer, AGENT, loss_scale="all").labels
    assert spelled(tokenizer, template.Encoded(second["input_ids"], second["labels"])) == [
        *plus(SYSTEM), *plus(USER_HI), *ASSISTANT, "y", "o", "<|im_end|>", "\n"]


def test_system_prompt_priority_row_then_flag_then_template_default(tmp_path, write_jsonl, tokenizer):
    data = write_jsonl("d.jsonl", [
        {"query": "hi", "response": "ok"},
        {"system": "Row.", "query": "hi", "response": "ok"},
        {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "ok"}]},
    ])
    plain = read_rows(tmp_path / "p") if prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "p"))) else []
    flagged = read_rows(tmp_path / "f") if prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "f"),
                                                                 system="Flag.")) else []
    texts = [[tokenizer.decode(r["input_ids"]).split("<|im_end|>")[0] for r in rows] for rows in (plain, flagged)]
    assert texts == [["<|im_start|>system\nYou are a helpful assistant.", "<|im_start|>system\nRow.",
                      "<|im_start|>system\nOwn."],
                     ["<|im_start|>system\nFlag.", "<|im_start|>system\nRow.", "<|im_start|>system\nOwn."]]


@pytest.mark.parametrize("strategy", ["delete", "left", "right"])
def test_truncation_strategy(tmp_path, write_jsonl, tokenizer, strategy):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    full = template.encode(tokenizer, messages)  # 25 tokens: 21 of prompt, y o <|im_end|> trained, \n
    assert spelled(tokenizer, full)[-5:] == ["\n", "+y", "+o", "+<|im_end|>", "\n"]
    data = write_jsonl("d.jsonl", [{"messages": messages}])
    out = tmp_path / strategy
    config = PrepareConfig(dataset=[str(data)], output_dir=str(out), max_length=22, truncation_strategy=strategy)
    if strategy == "delete":
        # the only row is deleted: every row rejected fails the preparation, rejects kept, no manifest
        with pytest.raises(InvalidArgument, match=r"every row was rejected \(1; too_long: 1\)") as info:
            prepare(config)
        assert info.value.field == "dataset" and not (out / "manifest.json").exists()
        reject = json.loads((out / "rejects.jsonl").read_text())
        assert reject["reason"] == "too_long" and "25 tokens; max_length is 22" in reject["error"]
        return
    manifest = prepare(config)
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"] == 1
    (row,) = read_rows(out)
    if strategy == "left":
        assert (row["input_ids"], row["labels"]) == (full.input_ids[-22:], full.labels[-22:])
    else:
        assert (row["input_ids"], row["labels"]) == (full.input_ids[:22], full.labels[:22])
        assert tokenizer.decode(row["input_ids"][-1:]) == "y" and row["labels"][-1] == row["input_ids"][-1]
    # cut to the prompt alone, nothing is left to train: rejected as too_long
    with pytest.raises(InvalidArgument, match="too_long: 1"):
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), max_length=21, truncation_strategy="right"))
    assert json.loads((out / "rejects.jsonl").read_text())["reason"] == "too_long"
