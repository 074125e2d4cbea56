"""Golden invariant of the training step (as TRL tests it): micro-batch 1 x accumulation 8
gives the same losses and weights as micro-batch 8 x accumulation 1, fp32 on CPU, because
every micro-batch's loss is divided by the trained tokens of the whole step. Real model,
real rows read over gRPC from a real dataprep server, the recipe's own step function."""

import json

import numpy as np
import pytest
import torch
from transformers import get_scheduler

from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import data, distributed, methods, modeling, training
from services.trainer.config import TrainConfig

STEPS = 3
# Answers of different lengths: rows then differ in trained tokens, so normalising per row
# or per micro-batch instead of per trained token of the step would change the update.
ANSWERS = ["Yes.", "I am Ada.", "I am Ada, an assistant.", "Bo made me, a long time ago, in a lab far away.",
           "No.", "Ada is my name and I help with questions about anything at all.", "Hi!", "I am an assistant."]


@pytest.fixture(scope="module")
def uneven_dataset(dataprep_address, default_model, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("uneven")
    raw = root / "uneven.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                    {"role": "assistant", "content": answer}]}) + "\n"
                           for i, answer in enumerate(ANSWERS)))
    dataprep_client.prepare(dataprep_address, PrepareConfig(model=str(default_model), dataset=[str(raw)],
                                                            output_dir=str(root / "prepared")))
    return str(root / "prepared")


def run(config: TrainConfig, model_dir, rows, micro_batch_size: int, accumulation: int):
    """STEPS optimizer steps; returns (losses, grad norms, trainable weights afterwards)."""
    torch.manual_seed(config.seed)
    model = modeling.build_model(config, model_dir)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.build_optimizer(model, config)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    engine = distributed.Engine(model, optimizer, distributed.World())
    method = methods.get(None)(config, engine.forward, model, None)
    batches = data.step_batches(rows, micro_batch_size, accumulation, lambda group: method.collate(group, 0))
    losses, norms = [], []
    for _ in range(STEPS):
        batch = next(batches)
        assert len(batch.micro_batches) == accumulation
        result = training.train_step(method, batch, trainable, engine, scheduler, config.max_grad_norm)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return losses, norms, weights


@pytest.mark.slow
def test_micro_batch_1_x_accumulation_8_equals_micro_batch_8_x_accumulation_1(default_model, uneven_dataset,
                                                                                 dataprep_address):
    # dropout off: its random masks depend on tensor shapes, which is what differs here
    config = TrainConfig(lora_dropout=0.0, learning_rate=1e-3, lr_scheduler_type="linear", max_grad_norm=1.0)
    rows = data.DataprepRows(dataprep_address, uneven_dataset)
    read = [row for row, _ in rows.epoch_rows(data.DataCursor())]
    assert len(read) == len(ANSWERS)
    assert len({len(row.input_ids) for row in read}) > 1, "rows of one length would not exercise padding"
    assert len({int((row.labels[1:] != -100).sum()) for row in read}) > 1, "rows must differ in trained tokens"

    small_losses, small_norms, small = run(config, default_model, rows, micro_batch_size=1, accumulation=8)
    big_losses, big_norms, big = run(config, default_model, rows, micro_batch_size=8, accumulation=1)

    torch.testing.assert_close(small_losses, big_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small_norms, big_norms, rtol=1e-5, atol=1e-6)
    assert small_losses[-1] < small_losses[0]  # it trained: the weights moved the loss
    assert small.keys() == big.keys() and small
    # Weights get a looser bound than losses: AdamW moves a coordinate whose gradient is ~0 by
    # up to lr (1e-3) whatever the sign, so float noise of 1e-9 in such a gradient (summation
    # order differs with padding) can show as ~3e-5 there. The losses and gradient norms
    # above, which every coordinate feeds, are held to 1e-5.
    for name in small:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


class ListRows:
    """A RowSource over rows in memory (the packed rows below are built here, not by dataprep)."""

    def __init__(self, rows):
        self.rows = rows

    def epoch_rows(self, cursor):
        for i in range(cursor.skip, len(self.rows)):
            yield self.rows[i], data.DataCursor(cursor.epoch, skip=i + 1)


@pytest.mark.slow
def test_the_invariant_holds_for_packed_rows(default_model, uneven_dataset, dataprep_address):
    """Packed rows of different lengths (so padded, with block masks) split 1 x 8 or 8 x 1."""
    read = [row for row, _ in data.DataprepRows(dataprep_address, uneven_dataset).epoch_rows(data.DataCursor())]
    packed = []
    for i in range(8):  # each row packs 1 to 3 of the samples, in a different order
        samples = [read[(i + k) % len(read)] for k in range(1 + i % 3)]
        packed.append(data.Row(np.concatenate([s.input_ids for s in samples]),
                               np.concatenate([s.labels for s in samples]),
                               np.array([len(s.input_ids) for s in samples], dtype=np.int32)))
    config = TrainConfig(lora_dropout=0.0, learning_rate=1e-3, lr_scheduler_type="linear", max_grad_norm=1.0)
    small_losses, small_norms, small = run(config, default_model, ListRows(packed), micro_batch_size=1, accumulation=8)
    big_losses, big_norms, big = run(config, default_model, ListRows(packed), micro_batch_size=8, accumulation=1)
    torch.testing.assert_close(small_losses, big_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small_norms, big_norms, rtol=1e-5, atol=1e-6)
    assert small_losses[-1] < small_losses[0]
    for name in small:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
