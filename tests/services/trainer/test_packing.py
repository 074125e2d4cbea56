"""Packed rows keep their samples apart: the block-diagonal causal mask and flash-attn's varlen
lengths spelled out token by token, the path each attention implementation takes, and the
loss (and its gradient) on packed rows equal to the loss on the same samples unpacked within
1e-5, fp32 on CPU, on every CPU path (sdpa and eager with the dense mask, the mask prebuilt at
collation, varlen through a reference varlen kernel; FlexAttention's block mask forward only:
torch 2.13 has no FlexAttention backward on CPU), for chat rows read over gRPC from a real
dataprep server and for pre-training rows where every token trains."""

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
    half = packing.block_causal_mask([[2, 3]], 6, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ((half[0, 0] == 0).int().tolist() == allowed)
    assert set(half.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}


def test_varlen_lengths_are_every_rows_blocks_as_transformers_reads_them_from_positions():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    # row 0: samples of 2 and 3, then 1 padding token; row 1: one sample of 6 tokens
    kwargs = packing.varlen_kwargs([[2, 3], [6]], 6)
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 2, 5, 6, 12]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 6
    # what transformers derives from the same rows flattened into one (its batch-size-1 packed path)
    (cu_q, _), (longest, _) = prepare_fa_kwargs_from_position_ids(packing.position_ids([[2, 3], [6]], 6).reshape(1, -1))
    assert cu_q.tolist() == kwargs["cu_seq_lens_q"].tolist() and int(longest) == 6


class Configured(torch.nn.Module):
    def __init__(self, implementation):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": implementation})()


@pytest.mark.parametrize("implementation, path", [
    ("flash_attention_2", "varlen"), ("flash_attention_3", "varlen"), ("flex_attention", "block_mask"),
    ("sdpa", "dense"), ("eager", "dense"), ("some_hub_kernel", "dense")])
def test_each_attention_implementation_takes_its_path(implementation, path):
    assert packing.attention_path(Configured(implementation)) == path


def test_model_inputs_per_path(monkeypatch):
    monkeypatch.delenv("TUNEFORGE_PACKING_MASK", raising=False)
    row = data.Row(np.arange(1, 6, dtype=np.int32), np.arange(1, 6, dtype=np.int32), np.array([2, 3], np.int32))
    micro = data.collate([row, data.Row(np.arange(1, 7, dtype=np.int32), np.arange(1, 7, dtype=np.int32))], pad_id=0)
    assert micro.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]  # no [batch, 1, seq, seq] mask held
    assert micro.seq_lens == [[2, 3], [6]]
    dense = micro.model_inputs(torch.bfloat16, "dense")
    assert set(dense) == {"input_ids", "position_ids", "attention_mask"}
    assert torch.equal(dense["attention_mask"], packing.block_causal_mask([[2, 3], [6]], 6, torch.bfloat16))
    varlen = micro.model_inputs(torch.bfloat16, "varlen")
    assert "attention_mask" not in varlen and varlen["use_cache"] is False
    assert varlen["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 12]
    assert micro.model_inputs(torch.bfloat16, "block_mask").keys() == {"input_ids", "position_ids", "use_cache"}
    monkeypatch.setenv("TUNEFORGE_PACKING_MASK", packing.PREBUILT)
    prebuilt = data.collate([row], pad_id=0)
    assert prebuilt.attention_mask.shape == (1, 1, 5, 5)
    assert torch.equal(prebuilt.model_inputs(torch.float32, "varlen")["attention_mask"], prebuilt.attention_mask)


def packed(rows: list[data.Row]) -> data.Row:
    return data.Row(np.concatenate([r.input_ids for r in rows]), np.concatenate([r.labels for r in rows]),
                    np.array([len(r.input_ids) for r in rows], dtype=np.int32))


def packed_and_unpacked_losses(model, rows: list[data.Row], path: str):
    """(packed loss, unpacked loss, packed grads, unpacked grads) over the same samples: two
    packed rows of different lengths in one micro-batch (so one is padded) vs one sample a row."""
    halves = [packed(rows[:3]), packed(rows[3:])]
    results = []
    for micro in (data.collate(halves, pad_id=0), data.collate(rows, pad_id=0)):
        model.zero_grad()
        loss = sft_loss(model(**micro.model_inputs(torch.float32, path)).logits, micro.labels, micro.trained_tokens)
        loss.backward()
        results.append((loss.item(), micro.trained_tokens,
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


@pytest.fixture(scope="module")
def chat_rows(prepared_dataset, dataprep_address):
    rows = [row for row, _ in data.DataprepRows(dataprep_address, prepared_dataset).epoch_rows(data.DataCursor())]
    assert len({len(r.input_ids) for r in rows}) > 1
    return rows[:5]


@pytest.mark.parametrize("every_token_trains", [False, True], ids=["chat", "pretraining"])
def test_packed_loss_equals_unpacked(default_model, chat_rows, attention, every_token_trains):
    rows = chat_rows
    if every_token_trains:  # labels == input_ids: a sample's first label would cross the boundary if not cut
        rows = [data.Row(r.input_ids, r.input_ids.copy()) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    attention.use(model)
    model.eval()  # no dropout
    (packed_loss, packed_trained, packed_grads), (loss, trained, grads) = packed_and_unpacked_losses(
        model, rows, packing.attention_path(model))
    assert packed_trained == trained > 0
    assert abs(packed_loss - loss) < 1e-5, (packed_loss, loss)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-5)


def test_without_the_mask_samples_leak(default_model, chat_rows):
    """The check above can fail: restarted position ids with a plain padding mask, or alone
    with the model's cache on (transformers then builds no packed mask), give a different
    loss (the samples see each other)."""
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    micro = data.collate([packed(chat_rows)], pad_id=0)
    leaky = {"input_ids": micro.input_ids, "position_ids": micro.position_ids,
             "attention_mask": torch.ones_like(micro.input_ids)}
    unpacked = data.collate(chat_rows, pad_id=0)
    with torch.no_grad():
        leaked = sft_loss(model(**leaky).logits, micro.labels, micro.trained_tokens).item()
        cached = sft_loss(model(input_ids=micro.input_ids, position_ids=micro.position_ids).logits, micro.labels,
                          micro.trained_tokens).item()
        uncached = sft_loss(model(input_ids=micro.input_ids, position_ids=micro.position_ids, use_cache=False).logits,
                            micro.labels, micro.trained_tokens).item()
        # varlen inputs reaching a model that is not flash (a reference loaded without the policy's
        # implementation): the lengths are ignored, the position ids without a cache still isolate
        varlen_on_sdpa = sft_loss(model(**micro.model_inputs(torch.float32, "varlen")).logits, micro.labels,
                                  micro.trained_tokens).item()
        isolated = sft_loss(model(**micro.model_inputs()).logits, micro.labels, micro.trained_tokens).item()
        reference = sft_loss(model(**unpacked.model_inputs()).logits, unpacked.labels, unpacked.trained_tokens).item()
    assert abs(isolated - reference) < 1e-5
    assert abs(leaked - reference) > 1e-3
    assert abs(cached - reference) > 1e-3
    assert abs(uncached - reference) < 1e-5
    assert abs(varlen_on_sdpa - reference) < 1e-5


@pytest.mark.slow
def test_flex_attention_block_mask_forward_equals_unpacked(default_model, chat_rows):
    """FlexAttention's path (position ids, no cache: transformers builds a BlockMask) isolates
    the samples: forward only, as torch 2.13 has no FlexAttention backward on CPU (compiles
    with inductor, a C++ compiler needed: 30 s to 3 min here, by the machine's load)."""
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32,
                                                 attn_implementation="flex_attention")
    model.eval()
    assert packing.attention_path(model) == "block_mask"
    micro = data.collate([packed(chat_rows[:3]), packed(chat_rows[3:])], pad_id=0)
    unpacked = data.collate(chat_rows, pad_id=0)
    with torch.no_grad():
        inputs = micro.model_inputs(torch.float32, "block_mask")
        assert "attention_mask" not in inputs
        isolated = sft_loss(model(**inputs).logits, micro.labels, micro.trained_tokens).item()
        model.set_attn_implementation("sdpa")  # the unpacked reference: no second FlexAttention compile
        reference = sft_loss(model(**unpacked.model_inputs()).logits, unpacked.labels, unpacked.trained_tokens).item()
    assert abs(isolated - reference) < 1e-5, (isolated, reference)
