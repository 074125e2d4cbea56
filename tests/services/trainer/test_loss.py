"""The SFT loss against a direct per-token computation, and against HF's own causal-LM loss."""

import math

import torch

from libs.dataset.schema import IGNORE_INDEX
from services.trainer.losses.sft import sft_loss, trained_tokens


def direct_mean_loss(logits_rows: list[torch.Tensor], label_rows: list[list[int]]) -> float:
    """Mean over every trained token of -log p(label[t + 1] | position t), one token at a time."""
    total, count = 0.0, 0
    for logits, labels in zip(logits_rows, label_rows):
        for t in range(len(labels) - 1):
            target = labels[t + 1]
            if target == IGNORE_INDEX:
                continue
            total -= torch.log_softmax(logits[t].double(), dim=-1)[target].item()
            count += 1
    return total / count


def test_trained_tokens_counts_shifted_labels():
    labels = torch.tensor([[5, -100, 7, 8], [-100, -100, 3, -100]])
    # the first position is never predicted: [-100, 7, 8] and [-100, 3, -100]
    assert trained_tokens(labels) == 3


def test_accumulated_loss_equals_the_mean_over_every_trained_token():
    torch.manual_seed(0)
    vocab = 11
    rows = [
        [IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6],
        [IGNORE_INDEX, 2, 3],
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9, 1, 2, 3, 4],
        [IGNORE_INDEX, 7],
    ]
    logits_rows = [torch.randn(len(r), vocab) for r in rows]

    def micro_batch(indices):
        width = max(len(rows[i]) for i in indices)
        logits = torch.randn(len(indices), width, vocab)  # padding positions get noise: it must not count
        labels = torch.full((len(indices), width), IGNORE_INDEX)
        for j, i in enumerate(indices):
            logits[j, :len(rows[i])] = logits_rows[i]
            labels[j, :len(rows[i])] = torch.tensor(rows[i])
        return logits, labels

    micro = [micro_batch([0, 1]), micro_batch([2]), micro_batch([3])]
    n = sum(trained_tokens(labels) for _, labels in micro)
    assert n == 3 + 2 + 5 + 1
    accumulated = sum(sft_loss(logits, labels, n).item() for logits, labels in micro)
    expected = direct_mean_loss(logits_rows, rows)
    assert math.isclose(accumulated, expected, rel_tol=1e-5)
    # normalising each micro-batch by its own tokens (the classic mistake) gives another number
    per_micro = sum(sft_loss(l, y, trained_tokens(y)).item() for l, y in micro) / len(micro)
    assert not math.isclose(per_micro, expected, rel_tol=1e-3)


def test_single_batch_matches_hf_causal_lm_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16))
    input_ids = torch.randint(0, 64, (2, 9))
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    out = model(input_ids=input_ids, labels=labels)
    ours = sft_loss(out.logits, labels, trained_tokens(labels))
    assert torch.allclose(ours, out.loss, atol=1e-6)


def test_no_trained_token_gives_zero_not_nan():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss = sft_loss(logits, torch.full((1, 4), IGNORE_INDEX), 0)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(logits.grad).any()
