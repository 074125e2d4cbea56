"""`tuneforge rlhf --rlhf_type dpo` end to end (raw pairs prepared by an in-process dataprep,
trained by an in-process trainer's training process): at step 1 of a LoRA run the policy is
the reference (LoRA's B starts at 0), so the sigmoid loss is ln 2 and every reward 0, as
logging.jsonl records them; and every dpo flag reaches the job through the trainer proto."""

import json
import math

import numpy as np
import pytest

from cli import train as cli
from cli.main import main as tuneforge
from libs.common import checkpoint
from libs.common import config as cfg
from libs.common.errors import Problems
from services.trainer.config import from_arguments, to_arguments

PAIRS = [("who are you?", "I am Ada.", "I do not know."), ("What is two plus two?", "Four.", "Five."),
         ("Name a colour.", "Blue.", "I do not know."), ("hi", "Hello there!", "What?")]


@pytest.mark.slow
def test_dpo_step_1_is_ln_2_through_the_cli(tmp_path, capsys):
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       "rejected_response": r}) + "\n" for q, a, r in PAIRS))
    run = tmp_path / "run"
    code = tuneforge(["rlhf", "--rlhf_type", "dpo", "--dataset", str(raw), "--output_dir", str(run),
                      "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2",
                      "--lora_rank", "4", "--beta", "0.5", "--learning_rate", "1e-3"])
    _out, err = capsys.readouterr()
    assert code == 0, err
    assert "prepared 4 rows: 4 kept" in err and "2/2" in err
    manifest = json.loads((run / cli.PREPARED_SUBDIR / "manifest.json").read_text())
    assert manifest["task"] == "preference"
    entries = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    first, second = entries
    assert first["step"] == 1
    assert first["loss"] == float(np.float32(math.log(2)))  # -log sigmoid(0), in float32: exactly
    assert [first[name] for name in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                     "rewards/accuracies")] == [0.0, 0.0, 0.0, 0.0]
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert second["rewards/chosen"] != 0.0 and second["loss"] != first["loss"]  # step 1 moved the policy
    final = run / "checkpoint-2"
    checkpoint.verify(final)
    args = json.loads((final / "args.json").read_text())
    assert args["rlhf_type"] == "dpo" and args["dpo"]["beta"] == 0.5 and args["dpo"]["loss_type"] == ["sigmoid"]


def test_dpo_flags_reach_the_job_through_the_trainer_proto(tmp_path):
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("")
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    command = cfg.parse(cli.RlhfCommandConfig, [
        "--rlhf_type", "dpo", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"), "--beta", "0.25",
        "--loss_type", "sigmoid", "discopop", "sft", "--loss_weights", "1", "0.5", "0.2", "--label_smoothing", "0.1",
        "--rpo_alpha", "0.3", "--discopop_tau", "0.07", "--adapters", str(adapter), "--ref_adapters", str(adapter),
        "--precompute_ref_log_probs", "true"])
    assert cli.prepare_config(command, [str(raw)], tmp_path / "out").task == "preference"
    job = from_arguments(to_arguments(cli.job_config(command, str(tmp_path / "prepared"), "127.0.0.1:1")))
    dpo = job.dpo
    assert (job.rlhf_type, dpo.beta, dpo.loss_type, dpo.loss_weights, dpo.label_smoothing, dpo.rpo_alpha,
            dpo.discopop_tau) == ("dpo", 0.25, ["sigmoid", "discopop", "sft"], [1.0, 0.5, 0.2], 0.1, 0.3, 0.07)
    assert (job.adapters, job.ref_adapters, job.precompute_ref_log_probs) == ([str(adapter)], [str(adapter)], True)
    with pytest.raises(Problems, match="discopop_tau: not an argument of rlhf_type kto"):
        cfg.parse(cli.RlhfCommandConfig, ["--rlhf_type", "kto", "--dataset", str(raw), "--output_dir",
                                          str(tmp_path / "run"), "--discopop_tau", "0.1"])
