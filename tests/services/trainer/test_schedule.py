"""The optimisation flags are really applied: --lr_scheduler_type (cosine, linear, constant)
with --warmup_ratio gives the learning rates of their formulas step by step, and
--weight_decay shrinks matrices (not norms or biases) by lr x weight_decay per step."""

import math

import pytest
import torch

from services.trainer import modeling, training
from services.trainer.config import TrainConfig

LR, TOTAL, WARMUP_RATIO = 1e-3, 10, 0.2  # 2 warmup steps


def expected(kind: str, step: int) -> float:
    """The learning rate the optimizer uses at 0-based step `step`."""
    warmup = math.ceil(WARMUP_RATIO * TOTAL)
    if step < warmup:
        return LR * step / warmup
    progress = (step - warmup) / (TOTAL - warmup)
    return LR * {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[kind]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_follow_their_formulas_with_warmup(kind):
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=LR)
    scheduler = training.build_scheduler(optimizer, TrainConfig(lr_scheduler_type=kind, warmup_ratio=WARMUP_RATIO,
                                                         learning_rate=LR), TOTAL)
    rates = []
    for _ in range(TOTAL):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([expected(kind, s) for s in range(TOTAL)], abs=1e-12)
    assert rates[0] == 0.0 and rates[2] == pytest.approx(LR)


def test_weight_decay_shrinks_matrices_only(default_model):
    config = TrainConfig(train_type="full", learning_rate=0.1, weight_decay=0.5)
    model = modeling.build_model(config, default_model)
    optimizer = training.build_optimizer(model, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: Adam's own update is 0, only the decay moves weights
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=lambda m, name=name: f"{name}: {m}")
    assert any(p.ndim < 2 for p in model.parameters())  # norms exist and were left alone
