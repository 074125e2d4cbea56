"""Packed == unpacked through flash-attn's varlen kernel on CUDA (flash_attention_2, bf16): the
SFT method's loss and each sample's summed log-prob on packed rows (several samples a row,
kept apart by cu_seq_lens alone, no mask) against the same samples one a row.

Tolerance, bf16: the two layouts run different kernels (varlen over cu_seq_lens; the padded
batch is unpadded by transformers and run varlen per row) whose bf16 accumulation orders
differ, so the loss may differ by ~1e-3 relative; asserted within 1e-2 relative for the loss
and 5e-2 absolute per sample log-prob (summed over up to a few hundred tokens). In fp32 on
CPU the same comparison holds to 1e-5 (test_packing.py, reference varlen kernel).

    .venv/bin/python -m pytest -q -m gpu tests/services/trainer/test_packing_gpu.py
"""

import numpy as np
import pytest
import torch

from services.trainer import data, methods, packing
from services.trainer.config import TrainConfig
from services.trainer.logprobs import sequence_logps

pytestmark = pytest.mark.gpu


def flash_attention_2_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (none here)"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "needs the flash-attn package (flash_attention_2) on this CUDA machine"
    return None


def test_flash_varlen_packed_equals_unpacked_bf16(default_model):
    reason = flash_attention_2_missing()
    if reason:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    assert packing.attention_path(model) == "varlen"
    method = methods.get(None)(TrainConfig(), model, model, None)
    rng = np.random.default_rng(0)
    samples = [rng.integers(3, 3000, size=n).astype(np.int32) for n in (37, 120, 9, 300, 64, 211)]
    rows = [data.Row(s, s.copy()) for s in samples]

    def packed(group):
        return data.Row(np.concatenate([r.input_ids for r in group]), np.concatenate([r.labels for r in group]),
                        np.array([len(r.input_ids) for r in group], dtype=np.int32))

    results = []
    for micro in (method.collate([packed(rows[:3]), packed(rows[3:])], 0), method.collate(rows, 0)):
        for name in ("input_ids", "labels", "attention_mask", "position_ids", "sample_ids"):
            if getattr(micro, name) is not None:
                setattr(micro, name, getattr(micro, name).cuda())
        with torch.no_grad():
            inputs = micro.model_inputs(model.dtype, method.attention)
            logits = model(**inputs).logits  # [b, s, vocab]
            loss = method.loss(micro, method.counts(micro))[0].float().item()
        results.append((loss, sequence_logps(logits, micro.labels, micro.sample_ids, micro.num_samples)[0].float()))
    (packed_loss, packed_logps), (loss, logps) = results
    assert "attention_mask" not in method.collate([packed(rows[:3])], 0).model_inputs(model.dtype, method.attention)
    assert abs(packed_loss - loss) <= 1e-2 * abs(loss), (packed_loss, loss)
    torch.testing.assert_close(packed_logps, logps, rtol=0, atol=5e-2)
