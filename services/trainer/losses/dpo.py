"""The DPO losses: every loss type of TRL 1.16's DPOTrainer, one small function each, as pure
functions of per-pair log-probs, plus ms-swift's label smoothing of the sigmoid loss (cDPO),
its `rpo_alpha` (TRL 1.16 dropped it) and several loss types mixed with weights (MPO).

A loss type maps a pair to a number ([pairs] in, [pairs] out). The step's loss is each type's
sum over the micro-batch's pairs divided by the step's pairs (`sft` and the rpo term: by the
step's chosen tokens), weighted and added; with a single micro-batch that is TRL's mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Pairs:
    """What every DPO loss is a function of, per pair (each [pairs]): the summed log-probs of
    the chosen and rejected answers under the policy and the reference, and their token counts."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor | None = None  # ipo and sigmoid_norm average over them
    rejected_tokens: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta(self) -> torch.Tensor:
        """log(pi_c / ref_c) - log(pi_r / ref_r): the implicit reward margin / beta."""
        return self.chosen_logratios - self.rejected_logratios

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-ratios averaged over each answer's tokens (ipo, sigmoid_norm)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("this loss type averages over the answers' tokens: give chosen_tokens and rejected_tokens")
        return (self.chosen_logratios / self.chosen_tokens.clamp(min=1),
                self.rejected_logratios / self.rejected_tokens.clamp(min=1))


@dataclass(frozen=True)
class Params:
    beta: float
    label_smoothing: float = 0.0  # sigmoid (ms-swift's cDPO), robust, exo_pair, aot, aot_pair/aot_unpaired
    discopop_tau: float = 0.05


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-log sigmoid(logits) with labels flipped with probability eps (cDPO)."""
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


def sigmoid(x: Pairs, p: Params) -> torch.Tensor:
    # ms-swift applies label smoothing here (cDPO); TRL 1.16 does not (eps 0 is the same in both)
    return _smoothed(p.beta * x.delta, p.label_smoothing)


def hinge(x: Pairs, p: Params) -> torch.Tensor:
    return torch.relu(1 - p.beta * x.delta)


def ipo(x: Pairs, p: Params) -> torch.Tensor:
    # TRL averages the log-ratios over the answers' tokens (confirmed with the IPO authors)
    chosen, rejected = x.per_token()
    return (chosen - rejected - 1 / (2 * p.beta)) ** 2


def exo_pair(x: Pairs, p: Params) -> torch.Tensor:
    # EXO-pref (arXiv 2402.00856, eq. 16): KL(p_theta || p_smoothed) over {chosen, rejected}
    logits = p.beta * x.delta
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-p.label_smoothing))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(p.label_smoothing)))


def nca_pair(x: Pairs, p: Params) -> torch.Tensor:
    chosen, rejected = p.beta * x.chosen_logratios, p.beta * x.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust(x: Pairs, p: Params) -> torch.Tensor:
    eps, logits = p.label_smoothing, p.beta * x.delta
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def bco_pair(x: Pairs, p: Params) -> torch.Tensor:
    # TRL 1.16's: no running mean of the rewards (older TRL subtracted one)
    return -F.logsigmoid(p.beta * x.chosen_logratios) - F.logsigmoid(-p.beta * x.rejected_logratios)


def sppo_hard(x: Pairs, p: Params) -> torch.Tensor:
    return (x.chosen_logratios - 0.5 / p.beta) ** 2 + (x.rejected_logratios + 0.5 / p.beta) ** 2


def aot(x: Pairs, p: Params) -> torch.Tensor:
    # sorts across the pairs given (TRL: the device's micro-batch), so it depends on how they are batched
    policy, _ = torch.sort(x.chosen_logps - x.rejected_logps, dim=0)
    reference, _ = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)
    return _smoothed(p.beta * (policy - reference), p.label_smoothing)


def aot_unpaired(x: Pairs, p: Params) -> torch.Tensor:
    # ms-swift's (TRL < 1.0's) aot_pair; sorts across the pairs given, as aot
    chosen, _ = torch.sort(x.chosen_logratios, dim=0)
    rejected, _ = torch.sort(x.rejected_logratios, dim=0)
    return _smoothed(p.beta * (chosen - rejected), p.label_smoothing)


def apo_zero(x: Pairs, p: Params) -> torch.Tensor:
    # APO (arXiv 2408.06266, eq. 7): chosen likelihood up, rejected down
    return 1 - torch.sigmoid(p.beta * x.chosen_logratios) + torch.sigmoid(p.beta * x.rejected_logratios)


def apo_down(x: Pairs, p: Params) -> torch.Tensor:
    # APO eq. 8: both down, the rejected more
    return torch.sigmoid(p.beta * x.chosen_logratios) + 1 - torch.sigmoid(p.beta * x.delta)


def discopop(x: Pairs, p: Params) -> torch.Tensor:
    # DiscoPOP (arXiv 2406.08414, eq. 5): logistic and exponential losses mixed by sigmoid(logits / tau)
    logits = p.beta * x.delta
    mix = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def sft(x: Pairs, p: Params) -> torch.Tensor:
    # the chosen answer's NLL summed over its tokens: normalised by the chosen tokens, not the pairs
    return -x.chosen_logps


def sigmoid_norm(x: Pairs, p: Params) -> torch.Tensor:
    chosen, rejected = x.per_token()
    return -F.logsigmoid(p.beta * (chosen - rejected))


LOSSES: dict[str, Callable[[Pairs, Params], torch.Tensor]] = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair, "robust": robust,
    "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired,
    "aot_pair": aot_unpaired, "apo_zero": apo_zero, "apo_down": apo_down, "discopop": discopop, "sft": sft,
    "sigmoid_norm": sigmoid_norm,
}
# Loss types normalised by the step's chosen tokens (a mean NLL per token, as TRL's sft); the others by its pairs.
PER_CHOSEN_TOKEN = frozenset({"sft"})
# Loss types whose value for a pair depends on the other pairs of its micro-batch (they sort across it).
BATCH_DEPENDENT = frozenset({"aot", "aot_unpaired", "aot_pair"})


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             discopop_tau: float = 0.05, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards), each [pairs], of one loss type; the rewards
    are TRL's beta x (policy - reference) log-prob of each answer, detached."""
    x = Pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens,
              rejected_tokens)
    losses = LOSSES[loss_type](x, Params(beta, label_smoothing, discopop_tau))
    return losses, beta * x.chosen_logratios.detach(), beta * x.rejected_logratios.detach()


def mixed_loss(x: Pairs, params: Params, loss_types: list[str], loss_weights: list[float] | None,
               rpo_alpha: float | None, num_pairs: int, num_chosen_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the step's loss: sum over loss types of weight x (sum of the
    pairs' losses / `num_pairs` of the step; sft: / `num_chosen_tokens` of the step), plus
    rpo_alpha x the chosen answers' NLL per chosen token of the step (ms-swift's RPO)."""
    weights = loss_weights if loss_weights is not None else [1.0] * len(loss_types)
    total = x.chosen_logps.new_zeros(())
    for loss_type, weight in zip(loss_types, weights, strict=True):
        denominator = num_chosen_tokens if loss_type in PER_CHOSEN_TOKEN else num_pairs
        # a step with nothing to normalise by contributes no gradient rather than NaN
        total = total + weight * LOSSES[loss_type](x, params).sum() / max(denominator, 1)
    if rpo_alpha is not None:
        total = total + rpo_alpha * sft(x, params).sum() / max(num_chosen_tokens, 1)
    return total
