"""One preparation in-process: real JSONL in, real Arrow shards, rejects and manifest out."""

import hashlib
import json
import threading

import pyarrow as pa
import pytest

from libs.common.errors import Cancelled, InvalidArgument, NotFound, Problems
from services.dataprep import template
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare


def read_shard(path):
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def test_counts_add_up_and_bad_rows_go_to_rejects_with_file_and_line(tmp_path, write_jsonl, conversation,
                                                                       tokenizer):
    data = write_jsonl("train.jsonl", [
        conversation(1),
        "",
        "this is not json",
        conversation(2),
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        conversation(3),
    ])
    out = tmp_path / "out"
    seen = []
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=2), progress=seen.append)

    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (5, 3, 2)
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == {"invalid_json": 1, "invalid_role": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["field"], r["reason"], r["raw"]) for r in rejects] == [
        (str(data), 3, None, "invalid_json", "this is not json"),
        (str(data), 5, "messages[0].role", "invalid_role", json.dumps(
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]})),
    ]
    assert rejects[0]["error"].startswith(f"{data}:3: not a JSON object")

    # two shards of 2 and 1 rows, each row exactly the template's tokens
    assert [(s["file"], s["rows"]) for s in manifest["shards"]] == [("shard-00000.arrow", 2), ("shard-00001.arrow", 1)]
    rows = []
    for shard in manifest["shards"]:
        table = read_shard(out / shard["file"])
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        assert sum(table.column("length").to_pylist()) == shard["tokens"]
        rows += table.to_pylist()
    for i, row in zip((1, 2, 3), rows):
        encoded = template.encode(tokenizer, conversation(i)["messages"])
        assert row == {"input_ids": encoded.input_ids, "labels": encoded.labels, "length": len(encoded.input_ids)}
    assert manifest["tokens"] == sum(r["length"] for r in rows)
    assert manifest["trained_tokens"] == sum(1 for r in rows for label in r["labels"] if label != -100)

    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["sources"] == [{"path": str(data), "rows": 5,
                                    "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert manifest["chat_template_sha256"] == template.template_fingerprint(tokenizer)
    assert seen[-1].rows_in == 5 and seen[-1].shards_written == 2


def test_same_input_and_args_give_byte_identical_outputs(tmp_path, write_jsonl, conversation):
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(7)] + ["{broken"])
    outputs = []
    for name in ("a", "b", "a"):  # two directories, and a re-run over the first
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / name), shard_rows=3))
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert sorted(outputs[0]) == ["manifest.json", "rejects.jsonl", "shard-00000.arrow", "shard-00001.arrow",
                                  "shard-00002.arrow"]
    for name in ("rejects.jsonl", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"):
        assert outputs[0][name] == outputs[1][name] == outputs[2][name]
    assert outputs[0]["manifest.json"] == outputs[2]["manifest.json"]


def test_rerun_replaces_stale_shards_of_a_larger_earlier_run(tmp_path, write_jsonl, conversation):
    out = tmp_path / "out"
    prepare(PrepareConfig(dataset=[str(write_jsonl("big.jsonl", [conversation(i) for i in range(5)]))],
                          output_dir=str(out), shard_rows=1))
    manifest = prepare(PrepareConfig(dataset=[str(write_jsonl("small.jsonl", [conversation(0)]))],
                                     output_dir=str(out), shard_rows=1))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "shard-00000.arrow"]
    assert manifest["rows_out"] == 1


def test_missing_dataset_file_fails_naming_it_before_any_work(tmp_path, write_jsonl, conversation):
    present = write_jsonl("a.jsonl", [conversation(0)])
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(NotFound) as error:
        prepare(PrepareConfig(dataset=[str(present), str(missing)], output_dir=str(tmp_path / "out")))
    assert str(missing) in str(error.value) and error.value.field == "dataset"
    assert not (tmp_path / "out").exists()


def test_invalid_arguments_are_reported_together(tmp_path):
    with pytest.raises(Problems) as error:
        prepare(PrepareConfig(dataset=[], output_dir="", shard_rows=0, max_length=-1))
    assert len(error.value.problems) == 4


def test_a_system_prompt_that_is_not_utf8_is_refused_before_any_row(tmp_path, write_jsonl, conversation):
    """`--system $'\\xff'` reaches Python as a lone surrogate (surrogateescape): refused once,
    not as a tokenizer error on every row."""
    data = write_jsonl("train.jsonl", [conversation(1)])
    with pytest.raises(Problems) as error:
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), system="be \udcff brief"))
    assert error.value.problems == ["system: not UTF-8 text (a lone surrogate, e.g. from an argument that is not "
                                    "UTF-8)"]


def test_rows_longer_than_max_length_are_rejected_as_too_long(tmp_path, write_jsonl, conversation, tokenizer):
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    long = conversation(123456)
    limit = len(template.encode(tokenizer, short["messages"]).input_ids)
    assert len(template.encode(tokenizer, long["messages"]).input_ids) > limit
    data = write_jsonl("d.jsonl", [long, short])
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), max_length=limit))
    assert (manifest["rows_out"], manifest["rejected_by_reason"]) == (1, {"too_long": 1})
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert (reject["line"], reject["reason"]) == (1, "too_long")
    no_limit = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "all"), max_length=0))
    assert no_limit["rows_out"] == 2


def test_system_prompt_is_added_only_where_a_row_has_none(tmp_path, write_jsonl, conversation, tokenizer):
    own = {"messages": [{"role": "system", "content": "Mine."}, *conversation(1)["messages"]]}
    data = write_jsonl("d.jsonl", [conversation(1), own])
    out = tmp_path / "out"
    prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), system="Be brief."))
    rows = read_shard(out / "shard-00000.arrow").column("input_ids").to_pylist()
    with_default = [{"role": "system", "content": "Be brief."}, *conversation(1)["messages"]]
    assert rows[0] == template.encode(tokenizer, with_default).input_ids
    assert rows[1] == template.encode(tokenizer, own["messages"]).input_ids


def test_cancelled_preparation_stops_without_a_manifest(tmp_path, write_jsonl, conversation):
    data = write_jsonl("d.jsonl", [conversation(i) for i in range(300)])
    cancelled = threading.Event()

    def progress(p):
        if p.rows_in >= 100:
            cancelled.set()

    with pytest.raises(Cancelled):
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), shard_rows=50),
                progress=progress, cancelled=cancelled)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rows_the_models_template_refuses_are_rejected_as_template(tmp_path, default_model, write_jsonl,
                                                                   conversation, tokenizer):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(default_model, model)
    refusing = ("{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
                "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
    (model / "chat_template.jinja").write_text(refusing)
    bad = {"messages": [{"role": "user", "content": "FORBIDDEN"}, {"role": "assistant", "content": "ok"}]}
    data = write_jsonl("d.jsonl", [conversation(1), bad])

    manifest = prepare(PrepareConfig(model=str(model), dataset=[str(data)], output_dir=str(tmp_path / "out")))

    assert (manifest["rows_out"], manifest["rejected_by_reason"]) == (1, {"template": 1})
    assert manifest["args"]["model"] == str(model)
    assert manifest["chat_template_sha256"] == hashlib.sha256(refusing.encode()).hexdigest()
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["error"] == f"{data}:2: messages: the chat template refused the conversation: no forbidden words"


OPENING = [{"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "hm"},
                         {"role": "assistant", "content": "ok"}]},             # issue 12's row: the layout path
           {"messages": [{"role": "assistant", "content": " I start "}, {"role": "user", "content": "hm"},
                         {"role": "assistant", "content": "ok"}]},             # the per-row path (whitespace edges)
           {"text": "Once upon a time."}]                                     # pre-training: one assistant turn


@pytest.mark.parametrize("args", [{}, {"num_proc": 2}, {"streaming": True}, {"packing": True},
                                  {"streaming": True, "packing": True}, "cli"],
                         ids=["in_process", "num_proc_2", "streaming", "packing", "streaming_packing", "cli"])
def test_conversations_opening_with_an_answer_are_kept_in_every_code_path(tmp_path, write_jsonl, conversation,
                                                                           tokenizer, args):
    """Issue 12: a row opening with an assistant turn stopped the preparation with a
    traceback. It is a valid row (ms-swift trains it as a pre-training row, TRL as
    the template renders it): kept, with the template's ids, in every code path."""
    from cli.main import main as tuneforge
    from services.dataprep import formats

    data = write_jsonl("train.jsonl", [conversation(1), *OPENING])
    out = tmp_path / "out"
    if args == "cli":
        assert tuneforge(["prepare", "--dataset", str(data), "--output_dir", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
    else:
        manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), max_length=512, **args))
    encoded = [template.encode(tokenizer, formats.to_example(row).messages) for row in [conversation(1), *OPENING]]
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (4, 4, 0)
    assert manifest["trained_tokens"] == sum(e.trained_tokens for e in encoded)
    samples = []
    for shard in manifest["shards"]:
        for row in read_shard(out / shard["file"]).to_pylist():
            start = 0
            for length in row.get("seq_lens", [row["length"]]):  # a packed row: its samples, whole
                samples.append((row["input_ids"][start:start + length], row["labels"][start:start + length]))
                start += length
    assert sorted(samples) == sorted((e.input_ids, e.labels) for e in encoded)


def test_an_unforeseen_error_on_one_row_rejects_it_as_internal_error_and_the_run_goes_on(
        tmp_path, write_jsonl, conversation, monkeypatch, caplog):
    """A bug met on one row of a long preparation costs that row, not the run: it is
    rejected as internal_error naming its place, logged with its traceback, counted
    (manifest and metric). The fuzzer fails on any such reject, so bugs still fail tests."""
    from prometheus_client import REGISTRY

    from services.dataprep import formats

    real = formats.to_example

    def buggy(value, *args, **kwargs):
        if value.get("messages", [{}])[0].get("content") == "What is 2 plus 2?":
            return {}["a bug of ours"]
        return real(value, *args, **kwargs)

    monkeypatch.setattr(formats, "to_example", buggy)
    data = write_jsonl("train.jsonl", [conversation(1), conversation(2), conversation(3)])
    out = tmp_path / "out"
    before = REGISTRY.get_sample_value("tuneforge_dataprep_rows_rejected_total", {"reason": "internal_error"})
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out)))

    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected_by_reason"]) == (3, 2, {"internal_error": 1})
    assert REGISTRY.get_sample_value("tuneforge_dataprep_rows_rejected_total", {"reason": "internal_error"}) == before + 1
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert (reject["line"], reject["field"], reject["reason"], reject["raw"]) == (
        2, None, "internal_error", json.dumps(conversation(2)))
    assert reject["error"] == (f"{data}:2: internal error (a TuneForge bug; please report it with this row): "
                               "KeyError: 'a bug of ours'")
    [record] = [r for r in caplog.records if r.name == "tuneforge.dataprep"]
    assert record.fields == {"file": str(data), "line": 2, "error": "KeyError: 'a bug of ours'"}
    assert record.exc_info[0] is KeyError


def test_tokens_that_differ_from_apply_chat_template_stop_the_run(tmp_path, write_jsonl, conversation, monkeypatch):
    """Not a row's fault and true of every row: the preparation fails, nothing looks complete."""
    monkeypatch.setattr(template, "template_ids", lambda *args, **kwargs: [0])
    monkeypatch.setattr(template, "_checked", type(template._checked)())
    data = write_jsonl("train.jsonl", [conversation(1)])
    with pytest.raises(template.ReferenceMismatch, match="does not reproduce apply_chat_template's input_ids"):
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("tokenizer, error, message", [
    (" ", NotFound, "tokenizer: ' ': no such directory"), ("train.jsonl", InvalidArgument, "not a directory")])
def test_a_tokenizer_that_is_no_directory_is_named_not_a_crash(tmp_path, write_jsonl, conversation, tokenizer, error,
                                                               message, monkeypatch):
    """Found by test_dataprep_fuzz_grpc (tokenizer=' '): the fingerprint listed the files of a
    directory that did not exist, and the preparation crashed with INTERNAL."""
    data = write_jsonl("train.jsonl", [conversation(1)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as caught:
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), tokenizer=tokenizer))
    assert message in str(caught.value)
