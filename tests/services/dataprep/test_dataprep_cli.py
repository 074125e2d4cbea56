"""`tuneforge prepare`, in-process and through the service, via the real dispatcher."""

import json

import pytest

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


@pytest.mark.parametrize("case", ["empty", "blank_lines", "no_data_files", "every_row_rejected", "binary_csv"])
def test_bad_datasets_are_one_line_exit_2_and_leave_no_manifest(tmp_path, capsys, case):
    """Each user-facing dataset error: one line naming the dataset, exit 2, no traceback,
    nothing left that looks like a prepared dataset."""
    (tmp_path / "d").mkdir()
    dataset, expected = {
        "empty": ("empty.jsonl", "empty.jsonl: no rows"),
        "blank_lines": ("blank.jsonl", "blank.jsonl: no rows"),  # blank lines are not rows
        "no_data_files": ("d", "d: directory holds no dataset files"),
        "every_row_rejected": ("bad.jsonl", "bad.jsonl: every row was rejected (2; invalid_json: 1, unknown_format: 1)"),
        "binary_csv": ("bin.csv", "bin.csv: not a CSV file: binary data"),
    }[case]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "bad.jsonl").write_text('{"messages": [\n{"q": 1}\n')
    (tmp_path / "bin.csv").write_bytes(b"a,b\n\x00\x01\x02\xff")
    out = tmp_path / "out"
    assert tuneforge(["prepare", "--dataset", str(tmp_path / dataset), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("prepare: ")]  # no bar
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("tuneforge prepare: error: dataset: ") and expected in errors[0], errors
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*.arrow"))
