"""Per-sequence log-probs (services.trainer.logprobs) and the pair layout (services.trainer.pairs):
what every preference loss is computed from, checked against plain per-sequence arithmetic."""

from __future__ import annotations

import numpy as np
import torch

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data, pairs
from services.trainer.logprobs import sequence_logps, token_logps


def row(ids, labels, **kw) -> data.Row:
    return data.Row(np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32), **kw)


def reference_logps(logits: torch.Tensor, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum over t of log p(labels[t + 1] | logits[t]) where labelled, for one unpadded sequence."""
    logps = torch.log_softmax(logits.double(), -1)
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        if labels[t + 1] != IGNORE_INDEX:
            total += float(logps[t, labels[t + 1]])
            count += 1
    return total, count


def test_token_logps_masks_unlabelled_positions():
    logits = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    picked, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, False, True]]
    assert picked[0, 1] == 0.0
    assert torch.allclose(picked[0, 0], torch.log_softmax(logits[0, 0], -1)[3])


def test_unpacked_pairs_give_each_sequence_its_own_sum():
    gen = torch.Generator().manual_seed(1)
    pair_rows = [data.PairRow(row([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]), row([1, 2, 5], [-100, -100, 5]),
                              margin=0.5),
                 data.PairRow(row([6, 7], [-100, 7]), row([6, 8, 9, 9, 2], [-100, 8, 9, 9, 2]))]
    micro = pairs.collate(pair_rows, pad_id=0)
    assert micro.extras["chosen"].tolist() == [0, 1] and micro.extras["rejected"].tolist() == [2, 3]
    assert np.isnan(micro.extras["margins"][1]) and micro.extras["margins"][0] == 0.5
    logits = torch.randn(4, micro.input_ids.size(1), 11, generator=gen)
    got = pairs.pair_logps(logits, micro)
    sequences = [p.chosen for p in pair_rows] + [p.rejected for p in pair_rows]
    expected = [reference_logps(logits[i], s.input_ids.tolist(), s.labels.tolist()) for i, s in enumerate(sequences)]
    assert torch.allclose(got.chosen, torch.tensor([expected[0][0], expected[1][0]], dtype=got.chosen.dtype))
    assert torch.allclose(got.rejected, torch.tensor([expected[2][0], expected[3][0]], dtype=got.chosen.dtype))
    assert got.chosen_tokens.tolist() == [2, 1] and got.rejected_tokens.tolist() == [1, 4]


def test_packed_pairs_sum_within_their_samples_only():
    """Two pairs packed in one row, one in another: each sample's sum is its own tokens', and the
    first token of a sample never scores the last logit of the sample before it."""
    packed = [row([1, 2, 3, 1, 2, 4, 6, 7, 6, 8], [-100, 2, 3, 1, 2, 4, -100, 7, 6, 8],  # 1, 6: sample starts
                  seq_lens=np.array([3, 3, 2, 2], dtype=np.int32), margins=np.array([1.0, np.nan])),
              row([5, 5, 5, 9], [-100, 5, -100, 9], seq_lens=np.array([2, 2], dtype=np.int32),
                  margins=np.array([2.0]))]
    micro = pairs.collate(packed, pad_id=0)
    assert micro.num_samples == 6
    assert micro.extras["chosen"].tolist() == [0, 2, 4] and micro.extras["rejected"].tolist() == [1, 3, 5]
    assert micro.sample_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5, -1, -1, -1, -1, -1, -1]]
    logits = torch.randn(2, 10, 11, generator=torch.Generator().manual_seed(2))
    got = pairs.pair_logps(logits, micro)
    bounds = [(0, 0, 3), (0, 3, 6), (0, 6, 8), (0, 8, 10), (1, 0, 2), (1, 2, 4)]
    expected = [reference_logps(logits[r, a:b], packed[r].input_ids[a:b].tolist(), packed[r].labels[a:b].tolist())
                for r, a, b in bounds]
    assert torch.allclose(got.chosen, torch.tensor([expected[i][0] for i in (0, 2, 4)], dtype=got.chosen.dtype))
    assert torch.allclose(got.rejected, torch.tensor([expected[i][0] for i in (1, 3, 5)], dtype=got.chosen.dtype))
    assert got.chosen_tokens.tolist() == [2, 1, 1] and got.rejected_tokens.tolist() == [2, 1, 1]


def test_sequence_logps_of_one_sequence_equals_the_reference():
    ids, labels = [3, 1, 4, 1, 5], [-100, 1, 4, -100, 5]
    micro = data.collate([row(ids, labels)], pad_id=0)
    logits = torch.randn(1, 5, 9, generator=torch.Generator().manual_seed(3))
    sums, counts = sequence_logps(logits, micro.labels, micro.sample_ids, micro.num_samples)
    total, count = reference_logps(logits[0], ids, labels)
    assert abs(float(sums[0]) - total) < 1e-6 and int(counts[0]) == count == 3
