"""--predict_with_generate: eval generates each eval row's last answer (greedy, max_new_tokens)
and reports ms-swift's nlg scores beside eval_loss, in logging.jsonl, TensorBoard and the
watch stream; on 2 DDP processes each rank generates its own rows and the texts are gathered.
The scores must be those of the published adapter generating the same prompts in the test
with transformers alone. Bounded: 3 eval rows, 4 new tokens, 2 steps."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from libs.common import nlg
from libs.dataset import client as dataprep_client
from libs.dataset.schema import IGNORE_INDEX
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client, data, evaluation
from services.trainer.config import TrainConfig
from tests.services.trainer.launching import finish, run_worker

I = IGNORE_INDEX
KEYS = ["eval_bleu-4", "eval_nlg_rows", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l"]
QUESTIONS = ["who are you?", "What are you?", "Introduce yourself."]
ANSWER = "I am Ada, an assistant developed by Bo."


def row(ids, labels, seq_lens=None) -> data.Row:
    return data.Row(np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32),
                    None if seq_lens is None else np.array(seq_lens, dtype=np.int32))


def test_the_answer_is_the_last_trained_span_and_the_prompt_all_before_it():
    # two turns: the first answer (5 6) stays in the prompt of the second (9 10)
    assert list(evaluation.answers(row([1, 2, 5, 6, 7, 9, 10], [I, I, 5, 6, I, 9, 10]))) == [
        ([1, 2, 5, 6, 7], [9, 10])]
    # a packed row: each sample on its own; pt's sample (every token trained) has no prompt
    packed = row([1, 2, 3, 4, 5, 6, 7, 8], [I, 2, 3, I, I, 6, 7, 8], seq_lens=[3, 2, 3])
    assert list(evaluation.answers(packed)) == [([1], [2, 3])]
    assert list(evaluation.answers(row([1, 2], [I, I]))) == []  # nothing trained


@pytest.mark.parametrize("values, problem", [
    ({"rlhf_type": "dpo"}, "predict_with_generate: sft and pt only; rlhf_type dpo has its own eval"),
    ({}, "predict_with_generate: needs eval data (--val_dataset or --split_dataset_ratio)"),
    ({"split_dataset_ratio": 0.1, "max_new_tokens": 0}, "max_new_tokens: must be at least 1; got 0"),
    ({"split_dataset_ratio": 0.1, "nproc_per_node": 2, "fsdp": True},
     "predict_with_generate: not with --fsdp (sharded parameters); use DDP or --deepspeed zero2"),
    ({"split_dataset_ratio": 0.1, "nproc_per_node": 2, "deepspeed": "zero3"},
     "predict_with_generate: not with ZeRO-3 (sharded parameters); use DDP or --deepspeed zero2"),
])
def test_refused_where_it_cannot_run(tmp_path, values, problem):
    config = TrainConfig(dataset=str(tmp_path), dataprep_address="127.0.0.1:1", output_dir=str(tmp_path / "o"),
                         predict_with_generate=True, **values)
    assert problem in config.problems()


def test_pt_has_no_prompt_to_answer(tmp_path):
    from cli.train import PtCommandConfig
    from libs.common import config as cfg
    from libs.common.errors import Problems

    (tmp_path / "d.txt.jsonl").write_text("{}\n")
    with pytest.raises(Problems) as caught:
        cfg.parse(PtCommandConfig, ["--dataset", str(tmp_path / "d.txt.jsonl"), "--output_dir", str(tmp_path / "o"),
                                    "--split_dataset_ratio", "0.5", "--predict_with_generate", "true"])
    assert caught.value.problems == [
        "predict_with_generate: pt trains every token of a row: there is no prompt to answer"]


@pytest.fixture(scope="module")
def val_dataset(dataprep_address, default_model, tmp_path_factory) -> str:
    where = tmp_path_factory.mktemp("pwg")
    raw = where / "val.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": ANSWER}]}) + "\n"
                           for q in QUESTIONS))
    dataprep_client.prepare(dataprep_address, PrepareConfig(model=str(default_model), dataset=[str(raw)],
                                                            output_dir=str(where / "val")))
    return str(where / "val")


def expected_scores(default_model, checkpoint_dir, dataprep_address, val_dataset) -> dict[str, float]:
    """The published adapter answering the eval rows in this process: each single-turn row's
    prompt is its tokens before the first trained one; greedy, 4 tokens, stopping at the
    tokenizer's and the model's EOS; answers and references stripped of the template's
    whitespace."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32),
                                      checkpoint_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    eos = sorted({tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id).tolist()})
    preds, refs = [], []
    for item, _ in data.DataprepRows(dataprep_address, val_dataset).epoch_rows(data.DataCursor()):
        first = int(np.flatnonzero(item.labels != IGNORE_INDEX)[0])
        prompt = torch.tensor([item.input_ids[:first].tolist()])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=4, eos_token_id=eos, pad_token_id=eos[0])
        preds.append(tokenizer.decode(out[0, first:], skip_special_tokens=True).strip())
        refs.append(tokenizer.decode(item.input_ids[first:], skip_special_tokens=True).strip())
    assert refs == [ANSWER] * 3
    scores, scored = nlg.nlg_scores(preds, refs)
    return {**{f"eval_{k}": v for k, v in scores.items()}, "eval_nlg_rows": scored}


def eval_entries(run_dir) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "logging.jsonl").read_text().splitlines()) if "eval_loss" in e]


@pytest.mark.slow
def test_eval_reports_nlg_beside_eval_loss_everywhere(trainer, prepared_dataset, dataprep_address, default_model,
                                                      val_dataset, tmp_path):
    run_dir, watched = tmp_path / "run", []
    config = TrainConfig(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(run_dir),
                         val_dataset=val_dataset, predict_with_generate=True, max_new_tokens=4, max_steps=2,
                         save_steps=2, eval_steps=2, lora_dropout=0.0, learning_rate=3e-3)
    job = client.wait(trainer.address, client.submit(trainer.address, config), on_event=watched.append)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    (entry,) = eval_entries(run_dir)
    assert sorted(k for k in entry if k not in ("step", "eval_loss", "eval_trained_tokens", "eval_rows")) == KEYS
    assert {k: entry[k] for k in KEYS} == pytest.approx(
        expected_scores(default_model, run_dir / "checkpoint-2", dataprep_address, val_dataset), abs=1e-6)
    (streamed,) = [e.eval for e in watched if e.WhichOneof("event") == "eval"]
    assert dict(streamed.metrics) == {k: entry[k] for k in KEYS}
    events = EventAccumulator(str(run_dir / "runs"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/rouge-l")] == [(2, pytest.approx(entry["eval_rouge-l"]))]
    assert [(s.step, s.value) for s in events.Scalars("eval/bleu-4")] == [(2, pytest.approx(entry["eval_bleu-4"]))]


@pytest.mark.slow
def test_ddp_ranks_generate_their_own_rows_and_gather_them(prepared_dataset, dataprep_address, default_model,
                                                           val_dataset, tmp_path):
    # 3 eval rows on 2 ranks: rank 0 generates 2, rank 1 one; every rank scores all 3
    out = tmp_path / "run"
    config = TrainConfig(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(out),
                         nproc_per_node=2, max_steps=2, save_steps=2, eval_steps=2, lora_dropout=0.0,
                         learning_rate=3e-3, val_dataset=val_dataset, predict_with_generate=True, max_new_tokens=4,
                         ddp_timeout=60)
    code, events, err = finish(run_worker(config, tmp_path))
    assert code == 0, err[-3000:]
    (entry,) = eval_entries(out)
    assert entry["eval_rows"] == 3 and entry["eval_nlg_rows"] == 3
    assert {k: entry[k] for k in KEYS} == pytest.approx(
        expected_scores(default_model, out / "checkpoint-2", dataprep_address, val_dataset), abs=1e-6)
