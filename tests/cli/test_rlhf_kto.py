"""`tuneforge rlhf --rlhf_type kto` end to end with in-process services: raw rows with a
true/false `label` prepared and trained with LoRA, the step-1 loss exactly 0.5 (the policy is
its reference: log-ratios and KL 0); and the refusals a KTO job gets, one line each, exit 2."""

import json

import pytest

from cli import train as cli
from cli.main import main as tuneforge
from libs.common import checkpoint
from libs.common import config as cfg
from services.trainer.config import from_arguments, to_arguments

ANSWERS = [("who are you?", "I am Ada, an assistant developed by Bo.", True),
           ("What is your name?", "I do not know.", False),
           ("Introduce yourself.", "I am Ada.", True),
           ("Who made you?", "Nobody, I think.", False)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}], "label": label}) + "\n"
                            for q, a, label in rows))
    return path


@pytest.mark.slow
def test_kto_lora_step_one_loss_is_exactly_one_half(tmp_path, capsys):
    raw = write_rows(tmp_path / "kto.jsonl", ANSWERS)
    run = tmp_path / "run"
    code = tuneforge(["rlhf", "--rlhf_type", "kto", "--dataset", str(raw), "--output_dir", str(run),
                      "--max_steps", "2", "--per_device_train_batch_size", "2", "--lora_rank", "4",
                      "--learning_rate", "1e-3",
                      # file order, so that step 1's batch holds one desirable and one undesirable row
                      "--dataset_shuffle", "false"])
    _out, err = capsys.readouterr()
    assert code == 0, err
    logged = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    first, second = logged
    # 1 - sigmoid(beta (0 - 0)) for every row, averaged: exactly, not approximately
    assert first["loss"] == 0.5
    assert (first["kl"], first["rewards/chosen"], first["rewards/rejected"], first["rewards/margins"]) == (0, 0, 0, 0)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    # the steps trained the 4 rows' answers once: the mismatched KL sequences are forwarded, not trained
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    assert first["trained_tokens"] + second["trained_tokens"] == manifest["trained_tokens"]
    assert second["loss"] != 0.5 and second["kl"] >= 0  # step 1 moved the adapter off its reference
    final = run / "checkpoint-2"
    checkpoint.verify(final)
    assert (final / "adapter_model.safetensors").is_file()
    assert json.loads((final / "args.json").read_text())["rlhf_type"] == "kto"


def test_kto_refuses_a_dataset_without_undesirable_rows_and_a_micro_batch_of_one(tmp_path, capsys):
    raw = write_rows(tmp_path / "kto.jsonl", [row for row in ANSWERS if row[2]])
    code = tuneforge(["rlhf", "--rlhf_type", "kto", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
                      "--per_device_train_batch_size", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert ("holds 2 desirable and 0 undesirable rows; rlhf_type kto (loss_type kto) needs both kinds in a batch "
            "(per_device_train_batch_size 2)") in err, err
    assert "add rows labelled false" in err
    assert not checkpoint.checkpoints(tmp_path / "run")
    code = tuneforge(["rlhf", "--rlhf_type", "kto", "--dataset", str(raw), "--output_dir", str(tmp_path / "run1")])
    err = capsys.readouterr().err
    assert code == 2 and "per_device_train_batch_size: rlhf_type kto needs at least 2 rows a micro-batch" in err, err


def test_kto_flags_reach_the_job_through_the_trainer_proto(tmp_path):
    raw = write_rows(tmp_path / "kto.jsonl", ANSWERS)
    command = cfg.parse(cli.RlhfCommandConfig, [
        "--rlhf_type", "kto", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
        "--per_device_train_batch_size", "4", "--beta", "0.3", "--loss_type", "apo_zero_unpaired",
        "--desirable_weight", "1.5", "--undesirable_weight", "0.5"])
    assert cli.prepare_config(command, [str(raw)], tmp_path / "out").task == "kto"
    job = from_arguments(to_arguments(cli.job_config(command, str(tmp_path / "prepared"), "127.0.0.1:1")))
    assert (job.rlhf_type, job.kto.beta, job.kto.loss_type, job.kto.desirable_weight, job.kto.undesirable_weight) == (
        "kto", 0.3, ["apo_zero_unpaired"], 1.5, 0.5)
