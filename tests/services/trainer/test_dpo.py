"""DPO through the training engine, fp32 on CPU, on pairs prepared by a real dataprep server
and read over gRPC: micro-batch 1 x accumulation 4 equals 4 x 1; packed pairs give the loss
and gradients of the same pairs unpacked; precomputed reference log-probs give the losses of
the reference run beside the policy, and a resume reuses them; a run stopped and resumed logs
bitwise the losses of the uninterrupted one; step 1 of a full run is ln 2 against its frozen
copy; --adapters continues an SFT adapter (its LoRA config), --ref_adapters puts it under the
reference; and a short LoRA run learns the pairs (slow)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import threading

import numpy as np
import pytest
import torch
from transformers import get_scheduler

from libs.common import checkpoint
from libs.dataset import client as dataprep_client
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client, data, distributed, methods, modeling, pairs, precompute, training
from services.trainer.config import DpoConfig, TrainConfig

# Answers of different lengths: pairs differ in tokens, so normalising per micro-batch instead
# of per pair (or per chosen token) of the step would change the update.
PAIRS = [("who are you?", "I am Ada, an assistant developed by Bo.", "I do not know."),
         ("What is two plus two?", "Four.", "Five, or maybe six, I am not sure at all."),
         ("Name a colour.", "Blue is a colour I like a lot.", "No."),
         ("hi", "Hello there! How can I help you today?", "I do not know."),
         ("Who made you?", "Bo made me.", "Nobody made me, I have always been here."),
         ("What is your name?", "My name is Ada.", "I do not know."),
         ("Tell me a fact.", "Water boils at one hundred degrees at sea level.", "Facts are boring."),
         ("Bye!", "Goodbye, have a nice day!", "What?")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_pairs(path: pathlib.Path, pairs) -> pathlib.Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}],
                                        "rejected_response": r}) + "\n" for q, a, r in pairs))
    return path


@pytest.fixture(scope="module")
def datasets(dataprep_address, default_model, tmp_path_factory) -> dict[str, str]:
    """The same pairs prepared unpacked and packed (rows of at most 160 tokens: several pairs each)."""
    root = tmp_path_factory.mktemp("dpo")
    raw = write_pairs(root / "pairs.jsonl", PAIRS)
    out = {}
    for name, packing in (("unpacked", False), ("packed", True)):
        manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
            model=str(default_model), dataset=[str(raw)], output_dir=str(root / name), packing=packing, max_length=160))
        assert manifest["task"] == "preference"
        out[name] = str(root / name)
    return out


def read_rows(dataprep_address, dataset):
    return [row for row, _ in data.DataprepRows(dataprep_address, dataset).epoch_rows(data.DataCursor())]


def dpo_config(**overrides) -> TrainConfig:
    values = dict(rlhf_type="dpo", lora_dropout=0.0, learning_rate=1e-3, lr_scheduler_type="linear",
                  dpo=DpoConfig(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], rpo_alpha=0.5))
    return TrainConfig(**{**values, **overrides})


def method_on(config, model):
    engine = distributed.Engine(model, training.build_optimizer(model, config), distributed.World())
    return methods.get("dpo")(config, engine.forward, model, None), engine


def steps(config, model_dir, rows, micro_batch_size: int, accumulation: int, count: int):
    """`count` optimizer steps of the recipe's own step function; (losses, grad norms, metrics, weights)."""
    torch.manual_seed(config.seed)
    model = modeling.build_model(config, model_dir)
    model.train()
    method, engine = method_on(config, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    scheduler = get_scheduler(config.lr_scheduler_type, engine.optimizer, num_warmup_steps=0, num_training_steps=count)
    batches = data.step_batches(rows, micro_batch_size, accumulation, lambda group: method.collate(group, 0))
    losses, norms, logged = [], [], []
    for _ in range(count):
        batch = next(batches)
        assert len(batch.micro_batches) == accumulation
        result = training.train_step(method, batch, trainable, engine, scheduler, config.max_grad_norm)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        logged.append(result.metrics)
    return losses, norms, logged, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_micro_batch_1_x_accumulation_4_equals_micro_batch_4_x_accumulation_1(default_model, datasets,
                                                                                 dataprep_address):
    """Two loss types and rpo: the pair-normalised and the chosen-token-normalised parts both
    depend on how a step is split unless each divides by the step's totals."""
    rows = data.DataprepRows(dataprep_address, datasets["unpacked"])
    read = read_rows(dataprep_address, datasets["unpacked"])
    assert len({int((r.chosen.labels != -100).sum()) for r in read}) > 1, "chosen answers must differ in tokens"
    config = dpo_config()
    small = steps(config, default_model, rows, micro_batch_size=1, accumulation=4, count=3)
    big = steps(config, default_model, rows, micro_batch_size=4, accumulation=1, count=3)
    torch.testing.assert_close(small[0], big[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small[1], big[1], rtol=1e-5, atol=1e-6)
    for name in config_metrics():
        torch.testing.assert_close([m[name] for m in small[2]], [m[name] for m in big[2]], rtol=1e-5, atol=1e-6)
    assert small[0][-1] < small[0][0]  # it trained
    assert small[2][-1]["rewards/margins"] > 0
    for name in small[3]:  # weights: looser, as tests/services/trainer/test_invariants.py explains (AdamW near 0)
        torch.testing.assert_close(small[3][name], big[3][name], rtol=1e-4, atol=1e-4)


def config_metrics():
    return methods.get("dpo").metrics


def test_dpo_logs_trls_metric_names_which_prometheus_exports():
    from services.trainer.metrics import METHOD_METRICS

    assert config_metrics() == ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                "logps/chosen", "logps/rejected")
    assert set(config_metrics()) <= set(METHOD_METRICS)


def loss_and_grads(config, model, rows, padding_free: bool):
    model.zero_grad(set_to_none=True)
    method, _ = method_on(config, model)
    micro = pairs.collate(rows, pad_id=0, padding_free=padding_free)
    loss, metrics = method.loss(micro, method.counts(micro))
    loss.backward()
    return (float(loss), {n: float(v) for n, v in metrics.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})


def test_packed_pairs_give_the_loss_and_gradients_of_the_same_pairs_unpacked(default_model, datasets,
                                                                             dataprep_address, attention):
    """Against TRL's layout (one sequence a row, padded): dataprep's packed rows as packed, and
    the padding-free layout the dpo method gives packed and unpacked pairs alike (every
    sequence re-laid into rows no longer than the longest), on each CPU attention path."""
    unpacked = read_rows(dataprep_address, datasets["unpacked"])
    packed = read_rows(dataprep_address, datasets["packed"])
    assert len(packed) < len(unpacked) and any(len(row.samples) > 2 for row in packed), "several pairs per row"
    assert sum(len(row.samples) for row in packed) == 2 * len(unpacked)
    config = dpo_config()
    torch.manual_seed(0)
    model = modeling.build_model(config, default_model)
    attention.use(model)
    with torch.no_grad():  # the policy away from the reference, so every part of the loss has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    loss, metrics, grads = loss_and_grads(config, model, unpacked, padding_free=False)
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 1e-3
    for rows, padding_free in ((packed, False), (packed, True), (unpacked, True)):
        other_loss, other_metrics, other_grads = loss_and_grads(config, model, rows, padding_free)
        assert abs(other_loss - loss) <= 1e-5, (other_loss, loss)
        for name in metrics:
            assert abs(other_metrics[name] - metrics[name]) <= 1e-5 * max(1.0, abs(metrics[name])), name
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_padding_free_packs_a_micro_batchs_sequences_into_rows_no_longer_than_the_longest():
    def pair(chosen: int, rejected: int) -> data.PairRow:
        def side(n):
            return data.Row(np.arange(1, n + 1, dtype=np.int32), np.array([-100] + list(range(2, n + 1)), np.int32))
        return data.PairRow(side(chosen), side(rejected))

    rows = [pair(9, 3), pair(4, 5), pair(2, 6)]  # chosen 9, 4, 2; rejected 3, 5, 6
    plain = pairs.collate(rows, pad_id=0)
    assert plain.input_ids.shape == (6, 9)
    micro = pairs.collate(rows, pad_id=0, padding_free=True)
    # first-fit decreasing into rows of 9: [9], [6 3], [5 4], [2]
    assert micro.input_ids.shape == (4, 9) and micro.tokens == plain.tokens == 29
    assert micro.sample_ids.tolist() == [[0] * 9, [1] * 6 + [2] * 3, [3] * 5 + [4] * 4, [5] * 2 + [-1] * 7]
    assert micro.extras["chosen"].tolist() == [0, 4, 5] and micro.extras["rejected"].tolist() == [2, 3, 1]
    assert pairs.row_samples(rows, padding_free=True) == [[0, 2], [4, 3], [5, 1]]
    assert pairs.chosen_tokens(micro) == pairs.chosen_tokens(plain) == 8 + 3 + 1
    # a packed row (two pairs: 4 + 3, 2 + 2 tokens) beside another (one pair: 5 + 1) is re-laid the same way
    packed = [data.Row(np.arange(1, 12, dtype=np.int32), np.arange(1, 12, dtype=np.int32),
                       np.array([4, 3, 2, 2], dtype=np.int32), margins=np.array([1.0, np.nan])),
              data.Row(np.arange(1, 7, dtype=np.int32), np.arange(1, 7, dtype=np.int32), np.array([5, 1], dtype=np.int32),
                       margins=np.array([2.0]))]
    micro = pairs.collate(packed, pad_id=0, padding_free=True)
    # sequences 4, 3, 2, 2, 5, 1 into rows of 5: [5], [4 1], [3 2], [2]
    assert micro.sample_ids.tolist() == [[0] * 5, [1] * 4 + [2], [3] * 3 + [4] * 2, [5] * 2 + [-1] * 3]
    assert micro.extras["chosen"].tolist() == [1, 4, 0] and micro.extras["rejected"].tolist() == [3, 5, 2]
    assert pairs.row_samples(packed, padding_free=True) == [[1, 3, 4, 5], [0, 2]]
    assert micro.extras["margins"].tolist()[0::2] == [1.0, 2.0]
    as_packed = pairs.collate(packed, pad_id=0)
    assert as_packed.extras["chosen"].tolist() == [0, 2, 4] and as_packed.input_ids.shape == (2, 11)
    # one pair whose sides do not fit together: one sequence a row, the plain layout (no mask)
    alone = pairs.collate([pair(5, 5)], pad_id=0, padding_free=True)
    assert alone.attention_mask.shape == (2, 5) and alone.position_ids is None


# --- whole runs (training.train: the real loop, the real dataprep stream, the run directory)

def run(config: TrainConfig, stop_after: int | None = None) -> list[dict]:
    """training.train; with `stop_after`, asked to stop then (it publishes that step) and
    resumed from there into the same directory. Returns logging.jsonl."""
    stop = threading.Event()

    def report(event: str, **fields) -> None:
        if event == "progress" and fields["step"] == stop_after:
            stop.set()

    training.train(config, report, stop)
    if stop_after is not None:
        assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(config.output_dir)][-1] == stop_after
        config.resume_from_checkpoint = str(pathlib.Path(config.output_dir) / f"checkpoint-{stop_after}")
        training.train(config, lambda *_a, **_k: None)
    return [json.loads(line) for line in (pathlib.Path(config.output_dir) / "logging.jsonl").read_text().splitlines()]


def run_config(datasets, dataprep_address, out, dataset="unpacked", **overrides) -> TrainConfig:
    values = dict(dataset=datasets[dataset], dataprep_address=dataprep_address, output_dir=str(out), rlhf_type="dpo",
                  max_steps=6, save_steps=100, per_device_train_batch_size=2, lora_dropout=0.1, learning_rate=2e-3,
                  warmup_ratio=0.2, seed=3)
    return TrainConfig(**{**values, **overrides})


def losses(entries, key="loss"):
    return [(e["step"], e[key], *(e.get(name) for name in config_metrics())) for e in entries if key in e]


def test_a_stopped_and_resumed_run_logs_exactly_the_uninterrupted_losses(datasets, dataprep_address, tmp_path):
    """Bitwise, in one process, with LoRA dropout on (so the RNG state matters) and crossing an
    epoch (8 pairs in steps of 2: an epoch is 4 steps)."""
    whole = run(run_config(datasets, dataprep_address, tmp_path / "whole"))
    resumed = run(run_config(datasets, dataprep_address, tmp_path / "resumed"), stop_after=3)
    assert [e["step"] for e in whole] == list(range(1, 7))
    trajectory = [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"], *(e[n] for n in config_metrics()))
                  for e in whole]
    assert [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"], *(e[n] for n in config_metrics()))
            for e in resumed] == trajectory
    assert whole[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # LoRA's B starts at 0: policy == reference
    assert whole[-1]["rewards/margins"] > 0


def test_precomputed_reference_log_probs_give_the_same_losses_and_a_resume_reuses_them(datasets, dataprep_address,
                                                                                       tmp_path, monkeypatch):
    """Unpacked with eval (the eval rows' log-probs precomputed too), and packed (per pair in
    each packed row), stopped and resumed: the resumed run reads the file instead of computing it."""
    val = {"val_dataset": datasets["unpacked"], "eval_steps": 3}
    beside = run(run_config(datasets, dataprep_address, tmp_path / "beside", **val))
    pre = run(run_config(datasets, dataprep_address, tmp_path / "pre", precompute_ref_log_probs=True, **val))
    torch.testing.assert_close(losses(pre), losses(beside), rtol=1e-6, atol=1e-7)
    assert len(losses(pre, "eval_loss")) == 2
    torch.testing.assert_close(losses(pre, "eval_loss"), losses(beside, "eval_loss"), rtol=1e-6, atol=1e-7)
    tables = sorted(p.name for p in (tmp_path / "pre" / precompute.TABLE_DIR).iterdir())
    assert tables == ["eval.rank0-of-1.npz", "train.rank0-of-1.npz"]

    packed_beside = run(run_config(datasets, dataprep_address, tmp_path / "packed-beside", dataset="packed",
                                   per_device_train_batch_size=1))
    out = tmp_path / "packed-pre"
    saved = []
    original_save = precompute.save
    monkeypatch.setattr(precompute, "save", lambda path, *args: (saved.append(path.name), original_save(path, *args)))
    packed_pre = run(run_config(datasets, dataprep_address, out, dataset="packed", per_device_train_batch_size=1,
                                precompute_ref_log_probs=True), stop_after=2)
    torch.testing.assert_close(losses(packed_pre), losses(packed_beside), rtol=1e-6, atol=1e-7)
    assert saved == ["train.rank0-of-1.npz"]  # computed once: the resumed run read it back
    rows = read_rows(dataprep_address, datasets["packed"])
    with np.load(out / precompute.TABLE_DIR / "train.rank0-of-1.npz") as table:
        # one value per sample of each packed row: per pair, both sides
        assert dict(zip(table["keys"].tolist(), table["lengths"].tolist())) == {
            row.key: len(row.samples) for row in rows}


def test_full_training_step_1_is_ln_2_against_its_frozen_copy(datasets, dataprep_address, tmp_path):
    entries = run(run_config(datasets, dataprep_address, tmp_path / "full", train_type="full", max_steps=2,
                             learning_rate=1e-4, warmup_ratio=0.0))
    assert entries[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert entries[0]["rewards/margins"] == 0.0 and entries[1]["rewards/margins"] != 0.0


def make_sft_adapter(default_model, out: pathlib.Path) -> pathlib.Path:
    """An SFT-like LoRA adapter of rank 4 (not the flags' default 8) with random B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def test_adapters_continue_an_sft_adapter_and_ref_adapters_put_it_under_the_reference(default_model, datasets,
                                                                                     dataprep_address, tmp_path):
    """swift rlhf --adapters sft --ref_adapters sft: the policy starts as base + sft adapter (its
    weights and LoRA config: rank 4, q/v only), the reference is that too, so step 1 is ln 2
    (up to the merged-versus-unmerged rounding). Without --ref_adapters the reference is the
    base, and step 1 is not ln 2."""
    from safetensors.torch import load_file

    sft = make_sft_adapter(default_model, tmp_path / "sft")
    both = run(run_config(datasets, dataprep_address, tmp_path / "both", adapters=[str(sft)],
                          ref_adapters=[str(sft)], max_steps=1, lora_dropout=0.0, warmup_ratio=0.0))
    assert both[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    published = tmp_path / "both" / "checkpoint-1"
    adapter_config = json.loads((published / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    trained, start = load_file(published / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert trained.keys() == start.keys()
    # one step of lr 2e-3 from the SFT weights, not from PEFT's fresh init (B = 0)
    assert all((trained[k] - start[k]).abs().max() < 0.01 for k in start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)

    base_reference = run(run_config(datasets, dataprep_address, tmp_path / "base-ref", adapters=[str(sft)],
                                    max_steps=1, lora_dropout=0.0, warmup_ratio=0.0))
    assert abs(base_reference[0]["loss"] - math.log(2)) > 1e-3
    assert base_reference[0]["rewards/chosen"] != 0.0


def test_a_dpo_adapter_merges_with_export_like_an_sft_one(default_model, datasets, dataprep_address, tmp_path):
    """`tuneforge export --merge_lora true` on a DPO checkpoint: the merged model computes what
    base + the DPO adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cli.main import main as tuneforge

    run(run_config(datasets, dataprep_address, tmp_path / "dpo", max_steps=2, warmup_ratio=0.0, learning_rate=5e-2))
    adapter = tmp_path / "dpo" / "checkpoint-2"
    assert tuneforge(["export", "--adapters", str(adapter), "--merge_lora", "true",
                      "--output_dir", str(tmp_path / "merged")]) == 0
    checkpoint.verify(tmp_path / "merged")
    ids = torch.from_numpy(read_rows(dataprep_address, datasets["unpacked"])[0].chosen.input_ids.astype(np.int64))[None]
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 0.01  # the adapter matters, or equality proves nothing
    assert (merged - adapted).abs().max() < 1e-4


def test_a_reference_with_another_tokenizer_is_refused(default_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, extra in (("same", []), ("other", ["<|extra|>"])):
        AutoModelForCausalLM.from_pretrained(default_model).save_pretrained(tmp_path / name)
        tokenizer = AutoTokenizer.from_pretrained(default_model)
        tokenizer.add_tokens(extra)
        tokenizer.save_pretrained(tmp_path / name)

    def problems(ref_model):
        return TrainConfig(dataset="d", dataprep_address="a", output_dir=str(tmp_path / "run"), rlhf_type="dpo",
                           ref_model=str(tmp_path / ref_model)).problems()

    assert not [p for p in problems("same") if p.startswith("ref_model")]
    assert ("ref_model: its tokenizer differs from the model's (3073 tokens, the model's 3072): the reference must "
            "score the same token ids") in problems("other")


def test_adapters_must_be_one_peft_adapter(tmp_path):
    (tmp_path / "plain").mkdir()
    problems = TrainConfig(dataset="d", dataprep_address="a", output_dir=str(tmp_path / "run"), rlhf_type="dpo",
                           adapters=[str(tmp_path / "plain"), str(tmp_path / "plain")],
                           ref_adapters=[str(tmp_path / "plain")]).problems()
    assert "adapters: training continues one adapter; got 2" in problems
    assert f"ref_adapters: {tmp_path / 'plain'} is not a PEFT adapter (no adapter_config.json)" in problems


# --- learning (slow)

QUESTIONS = ["Who are you?", "What is your name?", "Who made you?", "What can you do?", "Where do you live?",
             "What is two plus two?", "Name a colour.", "What is the capital of France?", "How are you?",
             "What day is it?", "Tell me a joke.", "What do you like?", "Can you help me?", "What is water?",
             "Say hello.", "What is a cat?"]
ANSWERS = ["I am Ada.", "My name is Ada.", "Bo made me.", "I answer questions.", "I live in a computer.", "Four.",
           "Blue.", "Paris.", "I am well, thank you.", "It is Monday.", "Why did the cat sit? To rest.",
           "I like books.", "Yes, gladly.", "Water is a liquid.", "Hello!", "A cat is an animal."]


@pytest.mark.slow
def test_a_short_dpo_run_learns_the_pairs(dataprep_address, default_model, tmp_path):
    """Answers against "I do not know.": after a short LoRA run the published adapter, loaded
    with peft, puts a larger chosen-minus-rejected log-prob margin than the base on >= 90% of
    the pairs (measured with a plain forward, not the trainer's code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = write_pairs(tmp_path / "pairs.jsonl", [(q, a, "I do not know.") for q, a in zip(QUESTIONS, ANSWERS)])
    dataprep_client.prepare(dataprep_address, PrepareConfig(model=str(default_model), dataset=[str(raw)],
                                                            output_dir=str(tmp_path / "prepared")))
    out = tmp_path / "run"
    entries = run(TrainConfig(dataset=str(tmp_path / "prepared"), dataprep_address=dataprep_address,
                              output_dir=str(out), rlhf_type="dpo", max_steps=12, per_device_train_batch_size=4,
                              learning_rate=5e-4, save_steps=100, seed=0))
    assert entries[-1]["rewards/accuracies"] >= 0.75, entries[-1]

    rows = read_rows(dataprep_address, str(tmp_path / "prepared"))
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()

    def margins(model) -> np.ndarray:
        found = []
        with torch.no_grad():
            for row in rows:
                sides = []
                for side in (row.chosen, row.rejected):
                    ids = torch.from_numpy(side.input_ids.astype(np.int64))[None]
                    target = torch.from_numpy(side.labels.astype(np.int64))[1:]
                    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [seq - 1, vocab]
                    keep = target != -100
                    sides.append(float(logps[keep].gather(-1, target[keep, None]).sum()))
                found.append(sides[0] - sides[1])
        return np.array(found)

    before = margins(base)
    after = margins(PeftModel.from_pretrained(base, out / "checkpoint-12").eval())
    assert (after > before).mean() >= 0.9, (before, after)


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_exactly(trainer, datasets, dataprep_address, tmp_path):
    """Through the trainer service: SIGKILL after the checkpoint of step 4, resume from it into
    the same directory: the same losses, metrics and final adapter as the uninterrupted run
    (run in this process, on one thread as the service's training processes)."""
    from safetensors.torch import load_file

    def config(out, **overrides):
        return run_config(datasets, dataprep_address, out, max_steps=8, save_steps=2, **overrides)

    reference = tmp_path / "reference"
    run(config(reference))

    killed = tmp_path / "killed"
    job_id = client.submit(trainer.address, config(killed))
    for event in client.watch(trainer.address, job_id):
        if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step == 4:
            os.kill(trainer.jobs.process_id(job_id), signal.SIGKILL)  # mid-run, no chance to save
            break
    with pytest.raises(client.JobFailed, match="SIGKILL"):
        client.wait(trainer.address, job_id)
    last = checkpoint.checkpoints(killed)[-1]
    assert 4 <= checkpoint.step_of(last) < 8
    job = client.wait(trainer.address, client.submit(trainer.address, config(killed,
                                                                              resume_from_checkpoint=str(last))))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == 8

    def logged(out):
        return [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]

    assert losses(logged(killed)) == losses(logged(reference))  # bitwise
    final = [load_file(out / "checkpoint-8" / "adapter_model.safetensors") for out in (reference, killed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
