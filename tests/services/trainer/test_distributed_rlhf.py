"""DPO and the reward model on 2 CPU processes (gloo), launched as the trainer service launches
a job, under DDP, DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2: 10 steps match one process with the
same global batch, and so does the eval loss where the ranks' eval slices differ in length.

Same global batch: 21 pairs; 2 ranks x micro-batch 1 x accumulation 3 against one process x
micro-batch 1 x accumulation 6. Dataprep deals row j of an epoch's order to rank j % 2, so
step k reads rows 6k..6k+5 in both; each epoch's 4th step holds rows 18-20: rank 0 has 2
micro-batches, rank 1 one, and rank 1 runs a filler micro-batch of weight zero through the
method's whole loss (without it the sharded back ends' collectives would not pair up).
10 steps are 2.5 epochs.

The reference model: LoRA (ZeRO-2) disables the adapter on the policy's own weights; full DPO
keeps a frozen copy, whole on each rank under DDP (where it computes the precomputed
log-probs), sharded as the policy under ZeRO-3 (partitioned by DeepSpeed) and FSDP2
(fully_shard per decoder layer). (Full-parameter ZeRO-2 DPO ran 218-250 s here under heavy
load against 35 s for LoRA, so ZeRO-2 runs LoRA.) The file: ~110 s at light load.

The DDP DPO run reads shuffled rows with --precompute_ref_log_probs: each epoch deals the
rows to the ranks anew, so each rank needs the log-probs of rows another rank computed.

Tolerances, over the 10 steps: the loss and the eval loss within 1e-5 absolute; each logged
metric within 2e-5 of max(1, |value|) (summed log-probs run past -100); the gradient norm
before clipping within 5e-4 relative (a gradient off by a constant factor, which Adam would
hide, shows there). fp32 gradients summed across ranks in another order differ from one
process in the last bits. Measured here (max |loss diff|, metric, grad norm; eval loss):
  DDP     DPO full (shuffled, precomputed) 3.3e-9, 6.6e-7, 3.0e-6    RM LoRA 6.0e-8, 2.2e-7, 7.7e-8
  ZeRO-2  DPO LoRA 2.0e-7, 7.2e-7, 9.0e-7; eval 2.7e-7                RM LoRA 7.5e-8, 1.8e-7, 1.5e-7
  ZeRO-3  DPO full 2.9e-9, 3.4e-6, 2.7e-5; eval 8.9e-8                RM full 4.5e-8, 4.6e-7, 1.3e-6
  FSDP2   DPO full 2.4e-9, 1.2e-6, 1.0e-5; eval 2.2e-7                RM LoRA 9.7e-8, 3.0e-7, 2.2e-7
A wrong normalisation (per rank instead of per step) moves the losses by more than 1e-3.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest

from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import precompute, training
from services.trainer.config import TrainConfig
from tests.services.trainer.launching import finish, logged, run_worker

STEPS = 10
LOSS_TOLERANCE = 1e-5  # absolute, the loss and the eval loss
METRIC_TOLERANCE = 2e-5  # of max(1, |value|)
GRAD_NORM_TOLERANCE = 5e-4  # relative

# Answers of many lengths: normalising per micro-batch or per rank instead of per pair of the
# whole step would change the update.
PAIRS = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}." + " Easy." * (a % 4),
          "I do not know." if a % 3 else f"Maybe {a + b + 1}, or {a * b}, I am not sure at all.")
         for a, b in zip(range(2, 23), range(30, 9, -1))]
VAL = [("Name a colour.", "Blue is a colour.", "No."), ("hi", "Hello there! How can I help?", "I do not know."),
       ("Who made you?", "Bo made me.", "Nobody made me, I have always been here.")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datasets(dataprep_address, default_model, tmp_path_factory) -> dict[str, str]:
    """The 21 training pairs, and eval sets of 3 pairs (rank 0 reads 2, rank 1 one) and of 1
    pair (rank 1 reads none)."""
    root = tmp_path_factory.mktemp("rlhf-dist")
    out = {}
    for name, pairs in (("train", PAIRS), ("val3", VAL), ("val1", VAL[:1])):
        raw = root / f"{name}.jsonl"
        raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}],
                                           "rejected_response": r}) + "\n" for q, a, r in pairs))
        manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
            model=str(default_model), dataset=[str(raw)], output_dir=str(root / name)))
        assert manifest["task"] == "preference" and manifest["rows_out"] == len(pairs)
        out[name] = str(root / name)
    return out


def job(datasets, dataprep_address, output_dir, rlhf_type, train_type, val=None, **overrides) -> TrainConfig:
    values = dict(dataset=datasets["train"], dataprep_address=dataprep_address, output_dir=str(output_dir),
                  rlhf_type=rlhf_type, train_type=train_type, max_steps=STEPS, save_steps=STEPS, eval_steps=STEPS,
                  per_device_train_batch_size=1, gradient_accumulation_steps=3, lora_dropout=0.0,
                  learning_rate=5e-4, warmup_ratio=0.1, lr_scheduler_type="cosine", seed=7,
                  # file order: both runs see the same rows each step without relying on the shuffle
                  dataset_shuffle=False, val_dataset=datasets[val] if val else None, ddp_timeout=120)
    return TrainConfig(**{**values, **overrides})


# (id, back end, method, train type, eval set, other fields)
CASES = [
    ("ddp-dpo-full-precomputed-shuffled", {}, "dpo", "full", None,
     dict(dataset_shuffle=True, precompute_ref_log_probs=True)),
    ("ddp-rm-lora", {}, "rm", "lora", None, {}),
    ("zero2-dpo-lora-eval3", {"deepspeed": "zero2"}, "dpo", "lora", "val3", {}),
    ("zero2-rm-lora", {"deepspeed": "zero2"}, "rm", "lora", None, {}),
    ("zero3-dpo-full-eval1", {"deepspeed": "zero3"}, "dpo", "full", "val1", {}),
    ("zero3-rm-full", {"deepspeed": "zero3"}, "rm", "full", None, {}),
    ("fsdp-dpo-full-eval3", {"fsdp": True}, "dpo", "full", "val3", {}),
    ("fsdp-rm-lora", {"fsdp": True}, "rm", "lora", None, {}),
]


@pytest.fixture(scope="module")
def single(datasets, dataprep_address, tmp_path_factory):
    """One process, the same global batch (accumulation 6): run dirs by (method, train type,
    eval set, other fields), each trained on first use."""
    runs: dict[str, pathlib.Path] = {}

    def run(rlhf_type, train_type, val, overrides) -> pathlib.Path:
        key = json.dumps([rlhf_type, train_type, val, overrides], sort_keys=True)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"single-{rlhf_type}-{train_type}")
            training.train(job(datasets, dataprep_address, out, rlhf_type, train_type, val,
                               gradient_accumulation_steps=6, **overrides), lambda *a, **k: None)
            runs[key] = out
        return runs[key]

    return run


def worst(got: list[float], expected: list[float], scaled: bool = False) -> float:
    """The largest |difference|; `scaled`: each divided by max(1, |expected|) (summed
    log-probs run to -100 and more)."""
    assert len(got) == len(expected), (got, expected)
    return max(abs(a - b) / (max(1.0, abs(b)) if scaled else 1.0) for a, b in zip(got, expected))


@pytest.mark.slow
@pytest.mark.parametrize("backend,rlhf_type,train_type,val,overrides",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_two_processes_match_one(backend, rlhf_type, train_type, val, overrides, single, datasets,
                                 dataprep_address, tmp_path):
    expected = single(rlhf_type, train_type, val, overrides)
    out = tmp_path / "run"
    config = job(datasets, dataprep_address, out, rlhf_type, train_type, val, nproc_per_node=2, **backend,
                 **overrides)
    started = time.monotonic()
    code, events, err = finish(run_worker(config, tmp_path))
    assert code == 0, err[-3000:]
    seconds = time.monotonic() - started
    assert [e["event"] for e in events][-1] == "done"

    losses, reference = logged(out, "loss"), logged(expected, "loss")
    assert len(losses) == STEPS
    loss_diff = worst(losses, reference)
    norms = max(abs(a - b) / b for a, b in zip(logged(out, "grad_norm"), logged(expected, "grad_norm")))
    names = [n for n in json.loads((out / "logging.jsonl").read_text().splitlines()[0]) if "/" in n or n == "accuracy"]
    assert names  # the method's metrics (TRL's names) were logged
    metric_diff = max(worst(logged(out, n), logged(expected, n), scaled=True) for n in names)
    print(f"{rlhf_type} {train_type} {backend or 'ddp'}: {seconds:.1f} s; over {STEPS} steps max |loss - "
          f"single-process loss| = {loss_diff:.2e}, metrics {metric_diff:.2e}, grad norm relative {norms:.2e}")
    assert loss_diff <= LOSS_TOLERANCE, (losses, reference)
    assert metric_diff <= METRIC_TOLERANCE
    assert norms <= GRAD_NORM_TOLERANCE
    assert min(losses[-4:]) < losses[0]  # it trained
    if val:
        evals, expected_evals = logged(out, "eval_loss"), logged(expected, "eval_loss")
        assert len(evals) == 1 and logged(out, "eval_rows") == [len(VAL) if val == "val3" else 1]
        print(f"  eval over {val}: |eval_loss - single-process eval_loss| = {worst(evals, expected_evals):.2e}")
        assert worst(evals, expected_evals) <= LOSS_TOLERANCE
        assert worst(logged(out, "eval_rewards/accuracies"), logged(expected, "eval_rewards/accuracies")) == 0
    if overrides.get("precompute_ref_log_probs"):
        # each rank holds every row's reference log-probs, not only those of its first epoch
        for rank in (0, 1):
            with np.load(out / precompute.TABLE_DIR / f"train.rank{rank}-of-2.npz") as table:
                assert len(table["keys"]) == len(PAIRS)
