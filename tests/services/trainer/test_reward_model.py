"""The reward model (--rlhf_type rm) on real pairs prepared by a real dataprep server: its loss
equal to TRL 1.16's RewardTrainer on the same model and batch (with and without margins and
center_rewards_coefficient), packed pairs scoring exactly as unpacked ones, and a run's
publication: eval pair accuracy in logging.jsonl, a checkpoint transformers loads that scores
as the run did, no adapter name for serving, and `tuneforge export --merge_lora` of its adapter."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil

import pytest
import torch

from libs.common import checkpoint
from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import data, export, training
from services.trainer.config import RewardConfig, TrainConfig
from services.trainer.losses.reward import reward_loss
from services.trainer.methods import rm

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What do bees make?",
             "What is two plus two?", "What is frozen water called?", "Who wrote Romeo and Juliet?"]
ANSWERS = [("Paris.", "Madrid."), ("Eight.", "Three, I think."), ("Honey.", "Milk."), ("Four.", "Nine."),
           ("Ice.", "Steam, usually."), ("William Shakespeare.", "Newton.")]
MARGINS = [0.5, None, 2.0, -1.0, None, 0.25]


def row_key(row: data.Row) -> tuple[int, ...]:
    return tuple(row.input_ids.tolist())


@pytest.fixture(scope="module")
def reward_data(dataprep_address, default_model, tmp_path_factory):
    """(unpacked PairRows, packed Rows, dataset dir) of the same 6 reward pairs, 4 with a margin."""
    root = tmp_path_factory.mktemp("reward")
    raw = root / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
                                       "rejected_response": r, **({"margin": m} if m is not None else {})}) + "\n"
                           for q, (c, r), m in zip(QUESTIONS, ANSWERS, MARGINS)))
    read = {}
    for name, packing in (("unpacked", False), ("packed", True)):
        manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
            model=str(default_model), dataset=[str(raw)], output_dir=str(root / name), task="reward",
            packing=packing, max_length=256))
        assert manifest["task"] == "reward"
        read[name] = [row for row, _ in data.DataprepRows(dataprep_address, str(root / name)).epoch_rows(data.DataCursor())]
    assert len(read["unpacked"]) == 6 and 1 < len(read["packed"]) < 6  # several pairs share a packed row
    return read["unpacked"], read["packed"], str(root / "unpacked")


def job(dataset, dataprep_address, output_dir, **overrides) -> TrainConfig:
    values = dict(dataset=dataset, dataprep_address=dataprep_address, output_dir=str(output_dir), rlhf_type="rm",
                  lora_dropout=0.0, learning_rate=1e-3, per_device_train_batch_size=3, max_steps=2, save_steps=2,
                  val_dataset=dataset, seed=3)
    return TrainConfig(**{**values, **overrides})


def method_for(model, center_rewards_coefficient=None) -> rm.RewardModel:
    config = TrainConfig(rlhf_type="rm", rm=RewardConfig(center_rewards_coefficient))
    return rm.RewardModel(config, lambda **inputs: model(**inputs), model, None)


@pytest.fixture(scope="module")
def scorer(default_model):
    """A full reward model whose head gives rewards of order 1 (a fresh head's are ~0.1)."""
    torch.manual_seed(0)
    model = rm.build_reward_model(TrainConfig(rlhf_type="rm", train_type="full"), default_model)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_reward_loss_is_the_written_formula():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    margins = torch.tensor([0.5, 0.0, -1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = [-math.log(sig(1.0)), -math.log(sig(-1.0)), math.log(2)]
    torch.testing.assert_close(reward_loss(chosen, rejected), torch.tensor(plain))
    with_margins = [-math.log(sig(0.5)), -math.log(sig(-1.0)), -math.log(sig(1.0))]
    centred = [w + 0.1 * s ** 2 for w, s in zip(with_margins, (1.0, 0.0, 4.0))]
    torch.testing.assert_close(reward_loss(chosen, rejected, margins, 0.1), torch.tensor(centred))


def test_rewards_are_read_where_transformers_pools_each_sample():
    """Each sample's last token that is not the pad id (9 here), as transformers' pooling does a
    row: sample 1 ends with a pad-valued token (a tokenizer whose pad is its eos), sample 4 is
    nothing but (it falls back to its first token, as transformers' argmax does)."""
    sample_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [2, 3, 3, 3, 4, 4, -1]])
    input_ids = torch.tensor([[5, 6, 7, 5, 8, 9, 9], [4, 5, 9, 6, 9, 9, 9]])
    assert rm.sample_ends(sample_ids, input_ids, 9, 5).tolist() == [2, 4, 7, 10, 11]  # flat: row x 7 + position
    assert rm.sample_ends(sample_ids, input_ids, None, 5).tolist() == [2, 5, 7, 10, 12]
    for sample, end in enumerate(rm.sample_ends(sample_ids, input_ids, 9, 5).tolist()):
        rows, positions = (sample_ids == sample).nonzero(as_tuple=True)
        alone = input_ids[rows[0], positions]  # the sample as a row of its own, pooled as transformers does
        assert end == rows[0] * 7 + positions[0] + (torch.arange(len(alone)) * (alone != 9)).argmax()


def test_its_metrics_are_exported_as_prometheus_gauges():
    from services.trainer import metrics

    assert set(rm.RewardModel.metrics) <= set(metrics.METHOD_METRICS)
    assert rm.RewardModel.kinds == ("preference", "reward")


@pytest.mark.parametrize("margins,center", [(False, None), (True, None), (False, 0.05), (True, 0.01)])
def test_loss_equals_trl_reward_trainer(scorer, reward_data, default_model, tmp_path, margins, center):
    """TRL's compute_loss on its own collated batch vs ours on our collate of the same pairs,
    in one micro-batch and split over two (each divided by the step's pairs)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig as TrlRewardConfig, RewardTrainer

    pairs = reward_data[0]
    if not margins:
        pairs = [dataclasses.replace(pair, margin=None) for pair in pairs]
    examples = [{"chosen_ids": p.chosen.input_ids.tolist(), "rejected_ids": p.rejected.input_ids.tolist(),
                 **({"margin": p.margin if p.margin is not None else 0.0} if margins else {})} for p in pairs]
    args = TrlRewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, center_rewards_coefficient=center,
                           per_device_train_batch_size=len(pairs))
    trainer = RewardTrainer(model=scorer, args=args, train_dataset=Dataset.from_list(examples),
                            processing_class=AutoTokenizer.from_pretrained(default_model))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    assert ("margin" in batch) == margins
    scorer.train()  # TRL's metrics go under "train"; the model has no dropout left either way
    with torch.no_grad():
        expected = trainer.compute_loss(scorer, dict(batch)).item()
        method = method_for(scorer, center)
        micro = method.collate(pairs, pad_id=0)
        loss, metrics = method.loss(micro, method.counts(micro))
        halves = [method.collate(pairs[:2], 0), method.collate(pairs[2:], 0)]
        split = sum(method.loss(m, {"pairs": len(pairs)})[0].item() for m in halves)
    scorer.eval()
    logged = trainer._metrics["train"]
    assert abs(loss.item() - expected) < 1e-5, (loss.item(), expected)
    assert abs(split - expected) < 1e-5, (split, expected)
    assert metrics["accuracy"].item() == pytest.approx(logged["accuracy"][0], abs=1e-6)
    assert 0 < metrics["accuracy"].item() < 1  # the pairs are not all ordered one way: a real accuracy
    assert metrics["rewards/margins"].item() == pytest.approx(logged["margin"][0], abs=1e-5)
    mean = (metrics["rewards/chosen"] + metrics["rewards/rejected"]).item() / 2
    assert mean == pytest.approx(logged["mean_reward"][0], abs=1e-5)


@pytest.fixture
def switched(scorer, attention):
    """The scorer on one CPU attention path (conftest.CPU_PATHS), switched back afterwards."""
    before = scorer.config._attn_implementation
    attention.use(scorer)
    yield scorer
    scorer.set_attn_implementation(before)


def test_packed_pairs_score_as_unpacked(switched, reward_data):
    """Each pair's rewards, the loss and its gradients on packed rows (several pairs a row, kept
    apart on each CPU attention path) equal those on the same pairs one sequence a row."""
    scorer = switched
    unpacked, packed, _ = reward_data
    method = method_for(scorer, 0.01)
    results = []
    for rows in (unpacked, packed):
        micro = method.collate(rows, pad_id=0)
        scorer.zero_grad()
        rewards = method.rewards(micro)
        loss, _ = method.loss(micro, method.counts(micro))
        loss.backward()
        # the samples' tokens name the pairs: packing reorders them
        samples = [row_key(p.chosen) for p in rows] + [row_key(p.rejected) for p in rows] if rows is unpacked else [
            tuple(r.input_ids[start:start + n].tolist()) for r in rows
            for start, n in zip([0, *r.seq_lens.cumsum()[:-1]], r.seq_lens)]
        order = micro.extras["chosen"].tolist() + micro.extras["rejected"].tolist()
        by_sample = {samples[i]: rewards[i].item() for i in order}
        grads = {n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None}
        results.append((by_sample, loss.item(), grads))
    (unpacked_rewards, unpacked_loss, unpacked_grads), (packed_rewards, packed_loss, packed_grads) = results
    assert unpacked_rewards.keys() == packed_rewards.keys() and len(unpacked_rewards) == 12
    for sample, reward in unpacked_rewards.items():
        assert abs(packed_rewards[sample] - reward) < 1e-5
    assert abs(packed_loss - unpacked_loss) < 1e-5, (packed_loss, unpacked_loss)
    assert unpacked_grads.keys() == packed_grads.keys() and "score.weight" in unpacked_grads
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5)
    scorer.zero_grad()


def pair_rewards(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards transformers' own pooling gives each pair's chosen and rejected sequence."""
    with torch.no_grad():
        score = lambda row: model(input_ids=torch.tensor([row.input_ids.tolist()])).logits[0, 0]  # noqa: E731
        return torch.stack([score(p.chosen) for p in pairs]), torch.stack([score(p.rejected) for p in pairs])


def assert_scores_as_logged(model, pairs, entry):
    """The loaded model's rewards on the eval pairs give the run's last eval metrics."""
    chosen, rejected = pair_rewards(model, pairs)
    assert abs(chosen.mean().item() - entry["eval_rewards/chosen"]) < 1e-5
    assert abs(rejected.mean().item() - entry["eval_rewards/rejected"]) < 1e-5
    assert (chosen > rejected).float().mean().item() == pytest.approx(entry["eval_accuracy"], abs=1e-6)


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_a_run_publishes_a_reward_model_transformers_loads(reward_data, dataprep_address, default_model, tmp_path,
                                                           train_type):
    from transformers import AutoModelForSequenceClassification

    pairs, _, dataset = reward_data
    events = []
    config = job(dataset, dataprep_address, tmp_path / "run", train_type=train_type, save_steps=1, eval_steps=2,
                 learning_rate=1e-3 if train_type == "lora" else 1e-4)
    training.train(config, lambda event, **fields: events.append((event, fields)))
    first, final = tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"
    checkpoint.verify(final)
    # serving's follower loads checkpoints by adapter name: a reward model has none
    published = [fields for event, fields in events if event == "checkpoint"]
    assert [(f["path"], f["adapter_name"]) for f in published] == [(str(first), ""), (str(final), "")]
    args = json.loads((final / "args.json").read_text())
    assert args["rlhf_type"] == "rm" and args["train_type"] == train_type
    entries = [json.loads(line) for line in (tmp_path / "run" / "logging.jsonl").read_text().splitlines()]
    assert [sorted(k for k in e if "/" in k or "accuracy" in k) for e in entries] == [
        ["accuracy", "rewards/chosen", "rewards/margins", "rewards/rejected"]] * 2 + [
        ["eval_accuracy", "eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/rejected"]]
    # resumed from checkpoint-1 (head included), step 2 and its eval are the same, bit for bit
    shutil.copytree(first, tmp_path / "resumed" / first.name)
    training.train(dataclasses.replace(config, output_dir=str(tmp_path / "resumed"),
                                       resume_from_checkpoint=str(tmp_path / "resumed" / first.name)),
                   lambda *args, **fields: None)
    timeless = lambda e: {k: v for k, v in e.items() if "seconds" not in k and k != "tokens_per_second"}  # noqa: E731
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "logging.jsonl").read_text().splitlines()]
    assert list(map(timeless, resumed)) == list(map(timeless, entries))
    last = entries[-1]
    assert last["step"] == 2 and last["eval_rows"] == 6
    if train_type == "full":  # a Hugging Face directory, whole: config (num_labels 1, pad id), weights, tokenizer
        loaded = AutoModelForSequenceClassification.from_pretrained(final)
        assert (loaded.config.num_labels, loaded.config.pad_token_id) == (1, 0)
        assert_scores_as_logged(loaded.eval(), pairs, last)
        return
    # a PEFT adapter with the head trained whole beside it; transformers takes the base's config,
    # whose head has the default 2 labels, so num_labels=1 is given
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "score" in saved["modules_to_save"]
    adapted = AutoModelForSequenceClassification.from_pretrained(final, num_labels=1).eval()
    assert_scores_as_logged(adapted, pairs, last)
    # export merges it into a standalone reward model that needs no flag to load
    merged_dir = export.export(export.ExportConfig(adapters=[str(final)], merge_lora=True))
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == "LlamaForSequenceClassification" and merged.config.num_labels == 1
    assert not (merged_dir / "generation_config.json").exists()  # it scores, it does not generate
    for got, expected in zip(pair_rewards(merged, pairs), pair_rewards(adapted, pairs)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train_type", ["lora", "qlora"])
def test_under_an_adapter_the_head_trains_whole(reward_data, default_model, train_type):
    """LoRA and QLoRA (4-bit nf4 base, bitsandbytes on CPU): the base frozen, LoRA matrices and the
    whole score head trainable, and one backward reaches both."""
    torch.manual_seed(0)
    model = rm.build_reward_model(TrainConfig(rlhf_type="rm", train_type=train_type), default_model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.score.modules_to_save.default.weight" in trainable
    assert all("lora_" in name or ".score." in name for name in trainable)
    method = method_for(model)
    micro = method.collate(reward_data[0][:2], pad_id=0)
    loss, _ = method.loss(micro, method.counts(micro))
    loss.backward()
    assert 0.5 < loss.item() < 1.0  # a fresh head: rewards near 0, loss near ln 2
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "base_model.model.score.modules_to_save.default.weight" in reached
    assert any("lora_A" in name for name in reached) or any("lora_B" in name for name in reached)
