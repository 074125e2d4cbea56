"""User mistakes at the command line: one line naming the cause, exit 2, never a traceback."""

import json
import subprocess
import sys

import pytest


def tuneforge(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def assert_user_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("tuneforge") for line in lines), run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


def test_missing_model_directory(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    run = tuneforge("prepare", "--model", str(tmp_path / "no-such-model"), "--dataset", str(data),
                    "--output_dir", str(tmp_path / "out"))
    assert_user_error(run, "model", str(tmp_path / "no-such-model"))


def test_missing_model_directory_on_deploy_fails_before_the_engine_starts(tmp_path):
    run = tuneforge("deploy", "--model", str(tmp_path / "no-such-model"))
    assert_user_error(run, str(tmp_path / "no-such-model"))


def test_missing_dataset_file(tmp_path):
    run = tuneforge("prepare", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out"))
    assert_user_error(run, "dataset", "missing.jsonl")


def test_unknown_flag_gets_a_did_you_mean(tmp_path):
    run = tuneforge("prepare", "--datset", "x.jsonl", "--output_dir", str(tmp_path))
    assert_user_error(run, "--datset", "did you mean 'dataset'")


def test_unknown_command_and_service():
    assert_user_error(tuneforge("deplyo"), "did you mean 'deploy'")
    assert_user_error(tuneforge("serve", "database"), "dataprep, trainer, serving")


@pytest.mark.parametrize("command", ["demo", "prepare", "deploy", "model"])
def test_help_exits_zero(command):
    run = tuneforge(command, "--help")
    assert run.returncode == 0 and "usage" in run.stdout.lower(), run.stdout + run.stderr


def test_client_tls_flags_are_checked_and_need_remote_services(tmp_path, tls_files):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    run = tuneforge("sft", "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                    "--tls_client_cert", tls_files.client_cert)
    assert_user_error(run, "tls_client_cert and tls_client_key: give both or neither",
                      "tls_client_cert: needs tls_ca")
    run = tuneforge("sft", "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--tls_ca", tls_files.ca)
    assert_user_error(run, "tls_ca: the dataprep and trainer this command starts in-process")
    assert not (tmp_path / "out").exists()
