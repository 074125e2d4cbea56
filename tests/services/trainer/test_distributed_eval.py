"""Eval on 2 processes whose eval slices differ in length (3 eval rows: rank 0 reads 2, rank 1
reads 1). Under FSDP2 every forward all-gathers the parameters, so a rank that ran out of eval
rows must still take part in the other's forwards: without that the job hangs (or gloo fails
on mismatched collectives). The eval loss must also be the one of the 3 rows evaluated in one
process with the published adapter."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from libs.common import config as cfg
from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import data, evaluation, methods
from services.trainer.config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[3]
QUESTIONS = ["who are you?", "What are you?", "Introduce yourself."]
ANSWER = "I am Ada, an assistant developed by Bo."


def run_worker(config: TrainConfig, where: pathlib.Path, timeout: float) -> tuple[int, list[dict], str]:
    """The job's training process as the trainer service starts it (it launches torchrun)."""
    path = where / "job.json"
    cfg.save_json(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "services.trainer.worker", "--config", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


@pytest.mark.slow
def test_fsdp_eval_with_uneven_rank_slices_finishes_and_sums_every_row(prepared_dataset, dataprep_address,
                                                                       default_model, tmp_path):
    raw = tmp_path / "val.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": ANSWER}]}) + "\n"
                           for q in QUESTIONS))
    dataprep_client.prepare(dataprep_address, PrepareConfig(model=str(default_model), dataset=[str(raw)],
                                                            output_dir=str(tmp_path / "val")))
    out = tmp_path / "run"
    config = TrainConfig(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(out),
                       nproc_per_node=2, fsdp=True, max_steps=2, save_steps=2, eval_steps=2, lora_dropout=0.0,
                       val_dataset=str(tmp_path / "val"), ddp_timeout=60)
    code, events, err = run_worker(config, tmp_path, timeout=240)
    assert code == 0, err[-3000:]
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["eval_rows"] == 3, evals

    # the same 3 rows in one process, with the weights the run published at that step
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32),
                                      out / "checkpoint-2")
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with evaluation.eval_mode(model):
        sft = methods.get(None)(config, model, model, tokenizer)
        alone = evaluation.evaluate(sft, data.DataprepRows(dataprep_address, str(tmp_path / "val")), 1, pad_id)
    assert alone.rows == 3 and alone.trained_tokens == evals[0]["eval_trained_tokens"]
    assert abs(alone.loss - evals[0]["eval_loss"]) <= 1e-5 * alone.loss, (alone.loss, evals[0]["eval_loss"])
