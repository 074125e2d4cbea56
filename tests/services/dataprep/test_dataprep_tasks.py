"""Dataset tasks end to end, in-process: real JSONL/CSV in, real Arrow shards out,
with the columns each task writes (docs/dataset-format.md, *Shard schema*)."""

import json

import pyarrow as pa
import pytest

from libs.common.errors import InvalidArgument
from services.dataprep import template
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare
from services.dataprep.template import IGNORE_INDEX

Q = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4."}
BAD = {"role": "assistant", "content": "5."}


def run(tmp_path, rows, **args):
    """prepare() over rows -> (manifest, shard rows, rejects)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), **args))
    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(out / s["file"]))).read_all()
                             for s in manifest["shards"])
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["columns"] == {f.name: str(f.type) for f in table.schema}
    return manifest, table, [(r["line"], r["field"], r["reason"]) for r in rejects]


def test_preference_pairs_share_the_prompt_and_carry_margin(tmp_path, tokenizer):
    rows = [
        {"messages": [Q, GOOD], "rejected_response": "5."},
        {"messages": [Q, GOOD], "rejected_messages": [Q, BAD], "margin": 2},
        {"messages": [Q, GOOD]},                                                       # no rejected side
        {"messages": [Q, GOOD], "rejected_response": 5},                               # not a string
        {"messages": [Q, GOOD], "rejected_messages": [{"role": "user", "content": "other"}, BAD]},  # other prompt
        {"messages": [Q, GOOD], "rejected_response": "x", "margin": "big"},
    ]
    manifest, table, rejects = run(tmp_path, rows)
    assert table.schema.names == ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                                  "margin", "length"]
    assert str(table.schema.field("chosen_input_ids").type) == "list<item: int32>"
    assert str(table.schema.field("margin").type) == "double"
    chosen, rejected = template.encode(tokenizer, [Q, GOOD]), template.encode(tokenizer, [Q, BAD])
    for row in table.to_pylist():
        assert (row["chosen_input_ids"], row["chosen_labels"]) == (chosen.input_ids, chosen.labels)
        assert (row["rejected_input_ids"], row["rejected_labels"]) == (rejected.input_ids, rejected.labels)
        assert row["length"] == len(chosen.input_ids) + len(rejected.input_ids)
    prompt = template.encode_prompt(tokenizer, [Q])
    assert chosen.input_ids[:len(prompt)] == rejected.input_ids[:len(prompt)] == prompt
    assert chosen.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert table.column("margin").to_pylist() == [None, 2.0]
    assert rejects == [(3, "rejected_response", "no_rejected"), (4, "rejected_response", "invalid_content"),
                       (5, "rejected_messages", "invalid_messages"), (6, "margin", "invalid_label")]
    assert manifest["trained_tokens"] == 2 * (chosen.trained_tokens + rejected.trained_tokens)


def test_trl_prompt_chosen_rejected_columns_are_preference_pairs(tmp_path, tokenizer):
    """TRL's preference columns, as texts or message lists, explicit or implicit prompt,
    give the same pairs as ms-swift's messages + rejected_response."""
    rows = [
        {"prompt": Q["content"], "chosen": GOOD["content"], "rejected": BAD["content"]},
        {"prompt": [Q], "chosen": [GOOD], "rejected": [BAD], "margin": 1},
        {"chosen": [Q, GOOD], "rejected": [Q, BAD]},
        {"chosen": "4.", "rejected": "5."},                                             # no prompt to split off
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": 5},                      # not a string
        {"chosen": [Q, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]},  # other prompt
        {"prompt": "What is 2+2?", "chosen": [GOOD], "rejected": [BAD]},                # mixed shapes
    ]
    manifest, table, rejects = run(tmp_path, rows)
    chosen, rejected = template.encode(tokenizer, [Q, GOOD]), template.encode(tokenizer, [Q, BAD])
    assert table.num_rows == 3
    for row in table.to_pylist():
        assert (row["chosen_input_ids"], row["chosen_labels"]) == (chosen.input_ids, chosen.labels)
        assert (row["rejected_input_ids"], row["rejected_labels"]) == (rejected.input_ids, rejected.labels)
    assert table.column("margin").to_pylist() == [None, 1.0, None]
    assert rejects == [(4, "prompt", "not_prompt"), (5, "rejected", "invalid_content"),
                       (6, "rejected", "invalid_messages"), (7, "prompt", "invalid_messages")]


def test_reward_task_takes_the_same_pairs(tmp_path):
    manifest, table, rejects = run(tmp_path, [{"query": "2+2?", "response": "4", "rejected_response": "5",
                                               "margin": 0.5}], task="reward")
    assert table.column("margin").to_pylist() == [0.5] and table.num_rows == 1 and not rejects
    assert manifest["args"]["task"] == "reward"


def test_kto_rows_keep_their_boolean_label(tmp_path, tokenizer):
    rows = [{"messages": [Q, GOOD], "label": True}, {"messages": [Q, BAD], "label": False},
            {"messages": [Q, GOOD], "label": "yes"}, {"messages": [Q, GOOD], "label": 1}]
    _, table, rejects = run(tmp_path, rows)
    assert table.schema.names == ["input_ids", "labels", "label", "length"]
    assert table.column("label").to_pylist() == [True, False]
    assert table.column("input_ids").to_pylist()[1] == template.encode(tokenizer, [Q, BAD]).input_ids
    assert rejects == [(3, "label", "invalid_label"), (4, "label", "invalid_label")]


def test_kto_label_from_csv_text(tmp_path):
    data = tmp_path / "kto.csv"
    data.write_text('query,response,label\n"2+2?",4,true\n"2+2?",5,False\n')
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), task="kto"))
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "out" / manifest["shards"][0]["file"]))).read_all()
    assert table.column("label").to_pylist() == [True, False]


def test_prompt_rows_get_the_generation_prompt_and_keep_every_extra_column(tmp_path, tokenizer):
    rows = [
        {"messages": [Q], "solution": "4", "level": 1, "tags": ["math"], "meta": {"src": "gsm"}},
        {"messages": [{"role": "system", "content": "Be exact."}, Q], "solution": "4", "level": 3},
        {"messages": [Q], "solution": "4", "level": "hard"},          # not an int like the first row's
        {"messages": [Q], "solution": "4", "unknown": 1},              # a column the first row lacks
        {"messages": [Q, GOOD], "solution": "4"},                      # ends on an answer
        {"messages": [Q], "solution": "4", "length": 7},               # named like an output column
    ]
    manifest, table, rejects = run(tmp_path, rows)
    assert table.schema.names == ["input_ids", "solution", "level", "tags", "meta", "length"]
    assert {f.name: str(f.type) for f in table.schema} == {
        "input_ids": "list<item: int32>", "solution": "string", "level": "int64", "tags": "list<item: string>",
        "meta": "struct<src: string>", "length": "int32"}
    first, second = table.to_pylist()
    expected = template.template_ids(tokenizer, [Q], add_generation_prompt=True)
    assert first == {"input_ids": expected, "solution": "4", "level": 1, "tags": ["math"], "meta": {"src": "gsm"},
                     "length": len(expected)}
    assert tokenizer.decode(first["input_ids"]).endswith("<|im_start|>assistant\n")
    assert second["input_ids"] == template.template_ids(tokenizer, rows[1]["messages"], add_generation_prompt=True)
    assert (second["tags"], second["meta"], second["level"]) == (None, None, 3)
    assert rejects == [(3, "level", "invalid_extra"), (4, "unknown", "invalid_extra"), (5, "messages", "not_prompt"),
                       (6, "length", "invalid_extra")]
    assert manifest["trained_tokens"] == 0


def test_forced_prompt_task_reads_query_rows_and_keeps_solution(tmp_path, tokenizer):
    _, table, rejects = run(tmp_path, [{"problem": "1+1?", "solution": "2"}], task="prompt")
    assert table.to_pylist()[0]["solution"] == "2" and not rejects
    assert table.to_pylist()[0]["input_ids"] == template.template_ids(
        tokenizer, [{"role": "user", "content": "1+1?"}], add_generation_prompt=True)


def test_mixed_kinds_fail_naming_the_row_and_leave_nothing(tmp_path):
    rows = [{"messages": [Q, GOOD]}, {"messages": [Q, GOOD], "rejected_response": "5."}]
    with pytest.raises(InvalidArgument, match=r"data.jsonl:2: a preference row in a sft dataset") as error:
        run(tmp_path, rows)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("shard-*.arrow"))


def test_a_row_missing_its_kind_marker_is_rejected_not_a_mixed_dataset(tmp_path):
    _, _, rejects = run(tmp_path / "sft", [{"messages": [Q, GOOD]}, {"messages": [Q]}])
    assert rejects == [(2, "messages", "no_assistant")]
    # the kind is the most common among the first rows: an odd first row does not decide
    manifest, _, rejects = run(tmp_path / "odd", [{"messages": [Q]}, {"messages": [Q, GOOD]}, {"messages": [Q, BAD]}])
    assert rejects == [(1, "messages", "no_assistant")] and manifest["rows_out"] == 2
    _, _, rejects = run(tmp_path / "pref", [{"messages": [Q, GOOD]}, {"messages": [Q, GOOD], "rejected_response": "x"},
                                            {"messages": [Q, GOOD], "rejected_response": "y"}])
    assert rejects == [(1, "rejected_response", "no_rejected")]
    _, _, rejects = run(tmp_path / "kto", [{"messages": [Q, GOOD], "label": True}, {"messages": [Q, GOOD]}])
    assert rejects == [(2, "label", "invalid_label")]
    with pytest.raises(InvalidArgument, match=r"data.jsonl:2: a kto row in a preference dataset"):
        run(tmp_path / "mixed", [{"messages": [Q, GOOD], "rejected_response": "x"}, {"messages": [Q, GOOD],
                                                                                      "label": True}])


def test_pt_task_is_text_and_eos_every_token_trained(tmp_path, tokenizer):
    manifest, table, _ = run(tmp_path, [{"text": "Once upon a time."}], task="pt", drop_last_block=False)
    ids = tokenizer("Once upon a time.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert table.to_pylist() == [{"input_ids": ids, "labels": ids, "length": len(ids)}]
    assert manifest["trained_tokens"] == len(ids)


def test_use_chat_template_false_concatenates_and_ends_with_eos(tmp_path, tokenizer):
    _, table, _ = run(tmp_path, [{"text": "Once upon a time."}], use_chat_template=False)
    ids = tokenizer("Once upon a time.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert table.column("input_ids").to_pylist() == [ids]


def test_tools_need_a_template_that_renders_them(tmp_path):
    row = {"messages": [Q, GOOD], "tools": json.dumps([{"type": "function", "function": {"name": "add"}}])}
    bad = {"messages": [Q, GOOD], "tools": "{not json"}
    manifest, table, rejects = run(tmp_path / "qwen", [row, bad], template="qwen")
    assert table.num_rows == 1 and rejects == [(2, "tools", "invalid_tools")]
    _, table, rejects = run(tmp_path / "own", [row, bad])  # the default model's ChatML renders tools, as Qwen2.5's
    assert table.num_rows == 1 and rejects == [(2, "tools", "invalid_tools")]
    _, table, rejects = run(tmp_path / "chatml", [row, {"messages": [Q, GOOD]}], template="chatml")  # plain ChatML: none
    assert table.num_rows == 1 and rejects == [(1, "tools", "template")]
    reject = json.loads((tmp_path / "chatml" / "out" / "rejects.jsonl").read_text())
    assert "does not render tools" in reject["error"]


def test_system_prompt_priority_row_then_flag_then_template_default(tmp_path):
    rows = [{"system": "Row system.", "query": "hi", "response": "yo"}, {"query": "hi", "response": "yo"}]
    tokenizer = template.load_tokenizer(PrepareConfig().model or _default(), "qwen")
    _, flagged, _ = run(tmp_path / "flag", rows, template="qwen", system="Flag system.")
    _, default, _ = run(tmp_path / "none", rows, template="qwen")
    texts = [tokenizer.decode(ids) for ids in flagged.column("input_ids").to_pylist()]
    assert texts[0].startswith("<|im_start|>system\nRow system.<|im_end|>")
    assert texts[1].startswith("<|im_start|>system\nFlag system.<|im_end|>")
    assert tokenizer.decode(default.column("input_ids").to_pylist()[1]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")


def _default():
    from libs.default_model.resolve import resolve_model

    return resolve_model(None)


def test_unknown_template_and_task_are_config_errors(tmp_path):
    from libs.common.errors import Problems

    with pytest.raises(Problems) as error:
        prepare(PrepareConfig(dataset=["x.jsonl"], output_dir=str(tmp_path), template="vicuna", task="dpo"))
    text = str(error.value)
    assert "template: unknown template 'vicuna'; built-in templates: chatml, default, llama3, qwen" in text
    assert "task: expected one of auto, sft, pt, preference, kto, reward, prompt; got 'dpo'" in text


def test_over_grpc_a_preference_dataset_is_prepared_and_served_with_its_columns(dataprep_server, tmp_path, tokenizer):
    from libs.dataset import client

    address, _ = dataprep_server
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"messages": [Q, GOOD], "rejected_response": "5.", "margin": 1.5}) + "\n")
    manifest = client.prepare(address, PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"),
                                                     task="preference", template="chatml"), timeout=60)
    assert manifest["args"]["template"] == "chatml" and manifest["args"]["task"] == "preference"
    rows = [row for batch, _ in client.read_batches(address, str(tmp_path / "out"), timeout=30)
            for row in batch.to_pylist()]
    chatml = template.load_tokenizer(_default(), "chatml")
    assert len(rows) == 1 and rows[0]["margin"] == 1.5
    assert rows[0]["chosen_input_ids"] == template.encode(chatml, [Q, GOOD]).input_ids
    assert rows[0]["rejected_labels"] == template.encode(chatml, [Q, BAD]).labels


def test_over_grpc_an_unknown_template_is_invalid_argument_in_one_line(dataprep_server, tmp_path):
    from libs.dataset import client

    address, _ = dataprep_server
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [Q, GOOD]}) + "\n")
    with pytest.raises(InvalidArgument) as error:
        client.prepare(address, PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"),
                                              template="vicuna"), timeout=60)
    assert "unknown template 'vicuna'; built-in templates: chatml, default, llama3, qwen" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # worker start-up dominates: about 20 s on 2 cores
def test_num_proc_2_writes_the_same_bytes_for_pairs_and_prompt_rows(tmp_path):
    """600 rows: more than one tokenizing chunk, so both workers take part and the
    main process admits their rows in order (extra-column types, kinds)."""
    pairs = [{"query": f"{i}+{i}?", "response": str(2 * i), "rejected_response": str(i), "margin": i}
             for i in range(600)]
    prompts = [{"messages": [{"role": "user", "content": f"{i}+1?"}], "solution": str(i + 1), "n": i}
               for i in range(600)]
    for name, rows in (("pairs", pairs), ("prompts", prompts)):
        one, _, _ = run(tmp_path / name / "one", rows, shard_rows=250)
        two, _, _ = run(tmp_path / name / "two", rows, shard_rows=250, num_proc=2)
        assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
        assert len(one["shards"]) == 3
