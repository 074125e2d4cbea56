"""`tuneforge prepare`, in-process and through the service, via the real dispatcher."""

import json

from cli.main import main as tuneforge


def test_prepare_in_process_prints_a_summary(tmp_path, write_jsonl, conversation, capsys):
    data = write_jsonl("train.jsonl", [conversation(1), "oops", conversation(2)])
    out = tmp_path / "out"
    assert tuneforge(["prepare", "--dataset", str(data), "--output_dir", str(out), "--max_length", "512"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert captured.out == (f"prepared 3 rows: 2 kept, 1 rejected (invalid_json 1); {manifest['tokens']} tokens "
                            f"({manifest['trained_tokens']} trained) in 1 shard -> {out}\n")
    assert "prepare" in captured.err  # the progress bar
    assert manifest["args"]["max_length"] == 512


def test_prepare_through_the_service_with_relative_paths(dataprep_server, tmp_path, write_jsonl, conversation,
                                                         capsys, monkeypatch):
    address, _ = dataprep_server
    write_jsonl("train.jsonl", [conversation(i) for i in range(4)])
    monkeypatch.chdir(tmp_path)
    code = tuneforge(["prepare", "--dataset", "train.jsonl", "--output_dir", "rel-out", "--shard_rows", "3",
                      "--dataprep_address", address])
    assert code == 0
    assert capsys.readouterr().out.endswith(f"in 2 shards -> {tmp_path / 'rel-out'}\n")
    assert (tmp_path / "rel-out" / "shard-00001.arrow").exists()


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert tuneforge(["prepare", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tuneforge prepare: error: dataset: no such file: {tmp_path / 'missing.jsonl'}"]

    assert tuneforge(["prepare", "--datasets", "x.jsonl"]) == 2
    assert capsys.readouterr().err.splitlines() == [  # every problem at once
        "tuneforge prepare: error: unknown flag --datasets (did you mean 'dataset'?)",
        "tuneforge prepare: error: dataset: at least one dataset file is required",
        "tuneforge prepare: error: output_dir: required",
    ]
