"""KTO (--rlhf_type kto): the loss and metrics equal TRL 1.16's KTOTrainer on the same model and
batch (its own preparation, KL rotation, collation and compute_loss; ours on the same rows);
the formula with its weights; a step normalised by its rows; the clear refusals."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data
from services.trainer.config import KtoConfig, TrainConfig
from services.trainer.losses.kto import kto_kl, kto_loss
from services.trainer.methods import kto as kto_method
from tests.services.trainer.kto_trl import (EXAMPLES, full_policy, lora_policy, our_loss, rows_of, trl_loss,
                                            trl_lora_trainer, trl_trainer)

TRL_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


@pytest.mark.parametrize("reference, kto", [
    ("adapter off", {}),
    ("adapter off", {"loss_type": ["apo_zero_unpaired"], "beta": 0.3}),
    ("ref_model", {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.6}),
])
def test_loss_and_metrics_equal_trl_kto_trainer(default_model, tokenizer, tmp_path, reference, kto):
    trl_args = {**kto, "loss_type": kto.get("loss_type", ["kto"])[0]}
    if reference == "adapter off":  # LoRA: the reference is the policy with its adapter disabled, in both
        policy, config = lora_policy(default_model, **kto)
        trainer = trl_lora_trainer(policy, default_model, tokenizer, tmp_path, **trl_args)
    else:  # full training against --ref_model
        policy, config, trl_reference = full_policy(default_model, tmp_path, **kto)
        trainer = trl_trainer(copy.deepcopy(policy), trl_reference, tokenizer, tmp_path, **trl_args)
    prepared = [trainer.train_dataset[i] for i in range(len(EXAMPLES))]  # one batch, rotated as TRL does
    expected_loss, expected = trl_loss(trainer, prepared)
    method = kto_method.Kto(config, policy, policy, tokenizer)
    loss, metrics, _ = our_loss(method, rows_of(prepared), tokenizer.pad_token_id)
    print(f"{reference} {kto}: TRL loss {expected_loss:.8f}, ours {loss:.8f}; TRL {expected}; ours {metrics}")
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    for name in TRL_METRICS:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-5), name
    if trl_args["loss_type"] == "kto":
        assert expected["kl"] > 1e-3  # the KL term took part (a zero KL would not test its estimate)
    assert abs(expected["rewards/chosen"]) > 1e-3  # the policy differs from its reference


def test_mismatched_sequences_are_each_prompt_with_the_previous_rows_completion():
    def row(prompt, completion, label):
        return data.Row(np.array(prompt + completion, dtype=np.int32),
                        np.array([IGNORE_INDEX] * len(prompt) + completion, dtype=np.int32), label=label)

    rows = [row([1, 2], [3, 4, 5], True), row([6], [7], False), row([8, 9, 10], [11, 12], True)]
    got = [(r.input_ids.tolist(), r.labels.tolist()) for r in kto_method.mismatched(rows)]
    n = IGNORE_INDEX
    assert got == [([1, 2, 11, 12], [n, n, 11, 12]), ([6, 3, 4, 5], [n, 3, 4, 5]), ([8, 9, 10, 7], [n, n, n, 7])]
    # an answer with an untrained token inside (a second turn's prompt) keeps its labels as they are
    gapped = data.Row(np.array([1, 2, 3, 4, 5], dtype=np.int32), np.array([n, 2, n, 4, 5], dtype=np.int32), label=False)
    assert [r.labels.tolist() for r in kto_method.mismatched([gapped, rows[1]])] == [[n, 7], [n, 2, n, 4, 5]]


def test_weights_scale_each_kind_of_row_as_the_formula_says():
    policy = torch.tensor([-3.0, -5.0, -2.0, -8.0])
    reference = torch.tensor([-4.0, -4.5, -2.5, -6.0])
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.2)
    beta = 0.5

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    ratios = (policy - reference).tolist()
    expected = [2.0 * (1 - sigmoid(beta * (ratios[0] - 0.2))), 0.25 * (1 - sigmoid(beta * (0.2 - ratios[1]))),
                2.0 * (1 - sigmoid(beta * (ratios[2] - 0.2))), 0.25 * (1 - sigmoid(beta * (0.2 - ratios[3])))]
    losses, rewards = kto_loss(policy, reference, desirable, kl, beta, "kto", 2.0, 0.25)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([beta * r for r in ratios], rel=1e-6)
    unweighted, _ = kto_loss(policy, reference, desirable, kl, beta)
    assert (losses / unweighted).tolist() == pytest.approx([2.0, 0.25, 2.0, 0.25], rel=1e-6)
    apo, _ = kto_loss(policy, reference, desirable, kl, beta, "apo_zero_unpaired", 2.0, 0.25)
    assert apo.tolist() == pytest.approx([2.0 * (1 - sigmoid(beta * ratios[0])), 0.25 * sigmoid(beta * ratios[1]),
                                          2.0 * (1 - sigmoid(beta * ratios[2])), 0.25 * sigmoid(beta * ratios[3])],
                                         rel=1e-6)


def test_kl_estimate_is_detached_clamped_and_pooled():
    policy = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    reference = torch.tensor([-4.0, -4.0, -2.5])
    kl = kto_kl(policy, reference)
    assert kl.item() == pytest.approx((1.0 - 1.0 + 0.5) / 3) and not kl.requires_grad
    assert kto_kl(reference, policy).item() == 0.0  # negative estimates are clamped
    assert kto_kl(policy[:0], reference[:0]).item() == 0.0  # no mismatched sequence: no baseline
    # what every rank sees once the [sum, count] of another rank holding (1.5, 1 sequence) is added
    assert kto_kl(policy, reference, lambda t: t + torch.tensor([1.5, 1.0], dtype=t.dtype)).item() == pytest.approx(
        (0.5 + 1.5) / 4)


def test_a_step_is_the_mean_over_its_rows_whatever_the_accumulation_split(default_model, tokenizer):
    """apo_zero_unpaired (no KL term): micro-batch 2 x accumulation 2 gives the loss and
    gradients of micro-batch 4 x accumulation 1; with kto the per-row terms are the same too
    given the KL, which is estimated per micro-batch (test above)."""
    policy, config = lora_policy(default_model, loss_type=["apo_zero_unpaired"], beta=0.3)
    method = kto_method.Kto(config, policy, policy, tokenizer)
    rows = []
    for prompt, completion, label in EXAMPLES:
        p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        rows.append(data.Row(np.array(p + c, dtype=np.int32), np.array([IGNORE_INDEX] * len(p) + c, dtype=np.int32),
                             label=label))

    def step(groups):
        micros = [method.collate(group, tokenizer.pad_token_id) for group in groups]
        totals = {name: sum(method.counts(m)[name] for m in micros) for name in method.counts(micros[0])}
        policy.zero_grad()
        total = 0.0
        for micro in micros:
            loss, _ = method.loss(micro, totals)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in policy.parameters() if p.requires_grad]

    whole, whole_grads = step([rows])
    split, split_grads = step([rows[:2], rows[2:]])
    assert split == pytest.approx(whole, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(split_grads, whole_grads))


def test_kto_logs_trls_names_each_a_prometheus_gauge():
    from services.trainer import methods, metrics

    assert methods.get("kto") is kto_method.Kto
    assert kto_method.Kto.metrics == TRL_METRICS and set(TRL_METRICS) <= set(metrics.METHOD_METRICS)


def test_kto_job_refuses_a_micro_batch_of_one_and_a_precomputed_reference():
    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         per_device_train_batch_size=1, precompute_ref_log_probs=True)
    found = config.problems()
    assert any(p.startswith("per_device_train_batch_size: rlhf_type kto needs at least 2 rows a micro-batch")
               and p.endswith("got 1 (raise it and lower gradient_accumulation_steps to keep the global batch)")
               for p in found), found
    assert any(p.startswith("precompute_ref_log_probs: not supported by rlhf_type kto") for p in found), found
    # apo_zero_unpaired has no KL term: one row a micro-batch is fine
    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         kto=KtoConfig(loss_type=["apo_zero_unpaired"]), per_device_train_batch_size=1)
    assert not [p for p in config.problems() if p.startswith("per_device_train_batch_size")]


@pytest.mark.slow
def test_kl_is_gathered_across_two_ddp_ranks_as_trl_gathers_it(default_model, tmp_path):
    """Two processes (gloo): in each, TRL's compute_loss on its rank's batch of 2 with
    Accelerate's gather of the KL, and ours through a DDP engine on the same rows and weights.
    Every rank's KL is the mean over both ranks' mismatched sequences (not its own), so is each
    rank's loss; the engine's sum of the ranks' shares is the mean of TRL's rank losses, which
    DDP's gradient average trains on. Eval, on one rank alone, gathers nothing."""
    root = pathlib.Path(__file__).resolve().parents[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.services.trainer.kto_trl", str(tmp_path), str(default_model)],
                              cwd=root, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for rank in ranks:
        try:
            _out, err = rank.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            pytest.fail(f"a rank did not finish in 180 s: {rank.communicate()[1][-3000:]}")
        assert rank.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    print(results)
    trl_kl = results[0]["trl_kl"]
    assert results[1]["trl_kl"] == trl_kl  # TRL's own gather: one KL for both ranks
    assert trl_kl == pytest.approx(max(0.0, (results[0]["local_kl"] + results[1]["local_kl"]) / 2), abs=1e-5)
    # the ranks' own estimates differ (one is negative, clamped to 0 alone): a rank's own KL would not pass
    assert abs(results[0]["local_kl"] - results[1]["local_kl"]) > 0.1
    assert sum(r["kl_share"] for r in results) == pytest.approx(trl_kl, abs=1e-5)
    for r in results:  # each rank's loss: its rows' mean with the gathered KL, as TRL's
        assert r["step_rows"] == 4
        assert r["loss_share"] * r["step_rows"] / r["rows"] == pytest.approx(r["trl_loss"], abs=1e-5)
    assert sum(r["loss_share"] for r in results) == pytest.approx(sum(r["trl_loss"] for r in results) / 2, abs=1e-5)
    # eval: a rank's eval micro-batch has its own estimate (ranks may hold different numbers of them)
    assert results[1]["eval_kl"] == pytest.approx(results[1]["local_kl"], abs=1e-5)


def test_a_filler_micro_batch_adds_nothing_to_the_pooled_kl(default_model, tokenizer, monkeypatch):
    """A rank short of micro-batches runs a filler (weight zero) so the ranks' KL sums pair up;
    it joins the sum with no sequence, or it would move the other ranks' estimate."""
    policy, config = lora_policy(default_model)
    method = kto_method.Kto(config, policy, policy, tokenizer)
    rows = []
    for prompt, completion, label in EXAMPLES:
        p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        rows.append(data.Row(np.array(p + c, dtype=np.int32), np.array([IGNORE_INDEX] * len(p) + c, dtype=np.int32),
                             label=label))
    pooled = []
    monkeypatch.setattr(kto_method, "all_sum", lambda totals: pooled.append(totals.tolist()) or totals)
    micro = method.collate(rows, tokenizer.pad_token_id)
    counts = method.counts(micro)
    method.loss(micro, counts)
    method.loss(dataclasses.replace(micro, filler=True), counts)
    assert pooled[0][1] == len(rows) and pooled[1] == [0.0, 0.0]  # (sum of differences, count)
