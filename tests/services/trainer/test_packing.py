"""Packed rows keep their samples apart: the block-diagonal causal mask spelled out token by
token, and the loss (and its gradient) on packed rows equal to the loss on the same samples
unpacked within 1e-5, fp32 on CPU, with eager and sdpa attention, for chat rows read over gRPC
from a real dataprep server and for pre-training rows where every token trains."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer import data, packing
from libs.dataset.schema import IGNORE_INDEX
from services.trainer.losses.sft import sft_loss

NEG = torch.finfo(torch.float32).min


def test_mask_positions_and_labels_token_by_token():
    # one row: samples of 2 and 3 tokens, then 1 padding token
    mask = packing.block_causal_mask([[2, 3]], 6)
    assert mask.shape == (1, 1, 6, 6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends only to itself: no all-masked row, no NaN
    ]
    assert set(mask.unique().tolist()) == {0.0, NEG}
    assert packing.position_ids([[2, 3]], 6).tolist() == [[0, 1, 0, 1, 2, 0]]
    labels = torch.tensor([[10, 11, 12, 13, 14, IGNORE_INDEX]])
    assert packing.cut_labels(labels, [[2, 3]]).tolist() == [[10, 11, IGNORE_INDEX, 13, 14, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="more than the row's 4 tokens"):
        packing.block_causal_mask([[2, 3]], 4)


def packed(rows: list[data.Row]) -> data.Row:
    return data.Row(np.concatenate([r.input_ids for r in rows]), np.concatenate([r.labels for r in rows]),
                    np.array([len(r.input_ids) for r in rows], dtype=np.int32))


def packed_and_unpacked_losses(model, rows: list[data.Row]):
    """(packed loss, unpacked loss, packed grads, unpacked grads) over the same samples: two
    packed rows of different lengths in one micro-batch (so one is padded) vs one sample a row."""
    halves = [packed(rows[:3]), packed(rows[3:])]
    results = []
    for micro in (data.collate(halves, pad_id=0), data.collate(rows, pad_id=0)):
        model.zero_grad()
        loss = sft_loss(model(**micro.model_inputs(torch.float32)).logits, micro.labels, micro.trained_tokens)
        loss.backward()
        results.append((loss.item(), micro.trained_tokens,
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


@pytest.fixture(scope="module")
def chat_rows(prepared_dataset, dataprep_address):
    rows = [row for row, _ in data.DataprepRows(dataprep_address, prepared_dataset).epoch_rows(data.DataCursor())]
    assert len({len(r.input_ids) for r in rows}) > 1
    return rows[:5]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("every_token_trains", [False, True], ids=["chat", "pretraining"])
def test_packed_loss_equals_unpacked(default_model, chat_rows, attention, every_token_trains):
    rows = chat_rows
    if every_token_trains:  # labels == input_ids: a sample's first label would cross the boundary if not cut
        rows = [data.Row(r.input_ids, r.input_ids.copy()) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32, attn_implementation=attention)
    model.eval()  # no dropout
    (packed_loss, packed_trained, packed_grads), (loss, trained, grads) = packed_and_unpacked_losses(model, rows)
    assert packed_trained == trained > 0
    assert abs(packed_loss - loss) < 1e-5, (packed_loss, loss)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-5)


def test_without_the_mask_samples_leak(default_model, chat_rows):
    """The check above can fail: restarted position ids with a plain padding mask give a
    different loss (the samples see each other)."""
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    micro = data.collate([packed(chat_rows)], pad_id=0)
    leaky = {"input_ids": micro.input_ids, "position_ids": micro.position_ids,
             "attention_mask": torch.ones_like(micro.input_ids)}
    unpacked = data.collate(chat_rows, pad_id=0)
    with torch.no_grad():
        leaked = sft_loss(model(**leaky).logits, micro.labels, micro.trained_tokens).item()
        isolated = sft_loss(model(**micro.model_inputs()).logits, micro.labels, micro.trained_tokens).item()
        reference = sft_loss(model(**unpacked.model_inputs()).logits, unpacked.labels, unpacked.trained_tokens).item()
    assert abs(isolated - reference) < 1e-5
    assert abs(leaked - reference) > 1e-3
