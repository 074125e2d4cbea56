"""services.trainer.losses.ppo against a plain-loop reference written here from the PPO and GAE
papers' formulas (one token, one float at a time; TRL 1.16 has no PPO left to compare with), and
services.trainer.losses.gkd against TRL 1.16's own GKDTrainer.generalized_jsd_loss, on fixed
tensors."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.losses import gkd as gkd_losses
from services.trainer.losses import ppo

# Three completions of 5, 3 and 1 real tokens (right padding), fixed numbers.
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
LOGPS = torch.tensor([[-1.2, -0.3, -2.5, -0.7, -0.1], [-0.9, -1.8, -0.4, 0.0, 0.0], [-3.1, 0.0, 0.0, 0.0, 0.0]],
                     dtype=torch.float64)
REF_LOGPS = torch.tensor([[-1.0, -0.5, -2.0, -0.9, -0.2], [-1.4, -1.1, -0.6, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0, 0.0]],
                         dtype=torch.float64)
OLD_LOGPS = torch.tensor([[-1.1, -0.2, -2.9, -0.8, -0.4], [-1.0, -1.2, -0.5, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0, 0.0]],
                         dtype=torch.float64)
VALUES = torch.tensor([[0.3, -0.2, 0.5, 0.1, 0.9], [-0.4, 0.2, 0.6, 7.0, 7.0], [1.5, 7.0, 7.0, 7.0, 7.0]],
                      dtype=torch.float64)  # 7.0 on padding: must not leak into anything
NEW_VALUES = VALUES + torch.tensor([[0.4, -0.05, 0.1, -0.3, 0.25], [0.0, 0.5, -0.15, 0.0, 0.0],
                                    [-0.35, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
SCORES = torch.tensor([1.5, -0.7, 0.2], dtype=torch.float64)
FINISHED = torch.tensor([True, False, True])


def lengths() -> list[int]:
    return [int(n) for n in MASK.sum(1)]


def reference_rewards(scores, kl_coef):
    """r_t = -kl_coef (log pi(a_t) - log ref(a_t)), plus the score on the last token."""
    out = []
    for i, n in enumerate(lengths()):
        row = [-kl_coef * (float(LOGPS[i, t]) - float(REF_LOGPS[i, t])) for t in range(n)]
        row[n - 1] += float(scores[i])
        out.append(row)
    return out


def reference_gae(rewards, values, gamma, lam):
    """delta_t = r_t + gamma V(s_{t+1}) - V(s_t); A_t = sum_l (gamma lam)^l delta_{t+l} (written
    as the sum, not the recursion), V = 0 after the episode's last token."""
    advantages, returns = [], []
    for row_r, row_v in zip(rewards, values):
        n = len(row_r)
        v = row_v + [0.0]
        deltas = [row_r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        a = [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]
        advantages.append(a)
        returns.append([a[t] + v[t] for t in range(n)])
    return advantages, returns


def reference_whiten(rows, shift_mean=True):
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    out = [[(x - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean) for x in row] for row in rows]
    return out


def as_rows(tensor) -> list[list[float]]:
    return [[float(tensor[i, t]) for t in range(n)] for i, n in enumerate(lengths())]


def padded(rows) -> torch.Tensor:
    out = torch.zeros_like(MASK)
    for i, row in enumerate(rows):
        for t, x in enumerate(row):
            out[i, t] = x
    return out


def test_kl_penalised_rewards_put_the_score_on_the_last_token_and_the_penalty_on_every_token():
    rewards, kl = ppo.kl_penalised_rewards(SCORES, LOGPS, REF_LOGPS, MASK, kl_coef=0.05)
    torch.testing.assert_close(rewards, padded(reference_rewards(SCORES.tolist(), 0.05)), rtol=0, atol=1e-12)
    torch.testing.assert_close(kl, (LOGPS - REF_LOGPS) * MASK, rtol=0, atol=1e-12)
    # the one-token completion: penalty and score on the same token
    assert float(rewards[2, 0]) == pytest.approx(-0.05 * (-3.1 + 2.0) + 0.2, abs=1e-12)


def test_missing_eos_penalty_lowers_only_unfinished_completions():
    out = ppo.penalise_missing_eos(SCORES, FINISHED, 1.0)
    assert out.tolist() == pytest.approx([1.5, -1.7, 0.2], abs=1e-12)
    assert ppo.penalise_missing_eos(SCORES, FINISHED, None) is SCORES


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_the_papers_sum_of_discounted_deltas(gamma, lam):
    rewards = reference_rewards(SCORES.tolist(), 0.05)
    advantages, returns = ppo.gae(padded(rewards), VALUES, MASK, gamma, lam)
    ref_a, ref_r = reference_gae(rewards, as_rows(VALUES), gamma, lam)
    torch.testing.assert_close(advantages, padded(ref_a), rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, padded(ref_r), rtol=0, atol=1e-12)


def test_gae_with_lambda_one_and_gamma_one_is_the_return_minus_the_value():
    rewards = reference_rewards(SCORES.tolist(), 0.05)
    advantages, returns = ppo.gae(padded(rewards), VALUES, MASK, 1.0, 1.0)
    for i, row in enumerate(rewards):
        for t in range(len(row)):
            assert float(returns[i, t]) == pytest.approx(sum(row[t:]), abs=1e-12)
            assert float(advantages[i, t]) == pytest.approx(sum(row[t:]) - float(VALUES[i, t]), abs=1e-12)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whitening_equals_whitening_the_real_tokens_only(shift_mean):
    rows = as_rows(VALUES)
    out = ppo.masked_whiten(VALUES, MASK, shift_mean=shift_mean)
    torch.testing.assert_close(out, padded(reference_whiten(rows, shift_mean)), rtol=0, atol=1e-12)
    assert float(out[MASK == 0].abs().sum()) == 0.0


def test_whitening_one_value_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        ppo.masked_whiten(VALUES, torch.tensor([[1.0, 0, 0, 0, 0], [0] * 5, [0] * 5], dtype=torch.float64))


@pytest.mark.parametrize("cliprange", [0.2, 0.05])
def test_clipped_policy_loss_equals_the_papers_objective_token_by_token(cliprange):
    advantages = ppo.masked_whiten(ppo.gae(padded(reference_rewards(SCORES.tolist(), 0.05)), VALUES, MASK, 1.0,
                                           0.95)[0], MASK)
    losses, clipped = ppo.policy_loss(LOGPS, OLD_LOGPS, advantages, cliprange)
    seen_clipped = 0
    for i, n in enumerate(lengths()):
        for t in range(n):
            ratio = math.exp(float(LOGPS[i, t]) - float(OLD_LOGPS[i, t]))
            a = float(advantages[i, t])
            # L^CLIP = min(r A, clip(r, 1 - eps, 1 + eps) A); the loss is its negative
            objective = min(ratio * a, min(max(ratio, 1 - cliprange), 1 + cliprange) * a)
            assert float(losses[i, t]) == pytest.approx(-objective, abs=1e-12)
            assert float(clipped[i, t]) == float(-min(max(ratio, 1 - cliprange), 1 + cliprange) * a > -ratio * a)
            seen_clipped += int(clipped[i, t])
    assert seen_clipped > 0  # the fixed numbers exercise the clipped branch


def test_clipped_value_loss_equals_the_written_formula_token_by_token():
    returns = ppo.gae(padded(reference_rewards(SCORES.tolist(), 0.05)), VALUES, MASK, 1.0, 0.95)[1]
    losses, clipped = ppo.value_loss(NEW_VALUES, VALUES, returns, 0.2)
    seen_clipped = 0
    for i, n in enumerate(lengths()):
        for t in range(n):
            v, old, r = float(NEW_VALUES[i, t]), float(VALUES[i, t]), float(returns[i, t])
            v_clipped = min(max(v, old - 0.2), old + 0.2)
            assert float(losses[i, t]) == pytest.approx(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2), abs=1e-12)
            seen_clipped += int(clipped[i, t])
    assert seen_clipped > 0


def test_the_whole_ppo_objective_equals_the_loop_reference():
    """Rewards (with whitening and the missing-EOS penalty), GAE, whitened advantages, both losses
    and their masked means with vf_coef, as one micro-batch's loss in TRL 0.x."""
    kl_coef, gamma, lam, cliprange, cliprange_value, vf_coef = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1
    scores = ppo.penalise_missing_eos(SCORES, FINISHED, 0.5)
    rewards, _ = ppo.kl_penalised_rewards(scores, LOGPS, REF_LOGPS, MASK, kl_coef)
    rewards = ppo.masked_whiten(rewards, MASK, shift_mean=False)
    advantages, returns = ppo.gae(rewards, VALUES, MASK, gamma, lam)
    advantages = ppo.masked_whiten(advantages, MASK)
    pg, _ = ppo.policy_loss(LOGPS, OLD_LOGPS, advantages, cliprange)
    vf, _ = ppo.value_loss(NEW_VALUES, VALUES, returns, cliprange_value)
    ours = ppo.masked_mean(pg, MASK) + vf_coef * ppo.masked_mean(vf, MASK)

    ref_rewards = reference_whiten(reference_rewards([1.5, -1.2, 0.2], kl_coef), shift_mean=False)
    ref_adv, ref_ret = reference_gae(ref_rewards, as_rows(VALUES), gamma, lam)
    ref_adv = reference_whiten(ref_adv)
    pg_terms, vf_terms = [], []
    for i, n in enumerate(lengths()):
        for t in range(n):
            ratio = math.exp(float(LOGPS[i, t]) - float(OLD_LOGPS[i, t]))
            a = ref_adv[i][t]
            pg_terms.append(-min(ratio * a, min(max(ratio, 1 - cliprange), 1 + cliprange) * a))
            v, old = float(NEW_VALUES[i, t]), float(VALUES[i, t])
            v_clipped = min(max(v, old - cliprange_value), old + cliprange_value)
            vf_terms.append(0.5 * max((v - ref_ret[i][t]) ** 2, (v_clipped - ref_ret[i][t]) ** 2))
    expected = sum(pg_terms) / len(pg_terms) + vf_coef * sum(vf_terms) / len(vf_terms)
    assert float(ours) == pytest.approx(expected, abs=1e-10)


# GKD against TRL's own function
@pytest.fixture(scope="module")
def gkd_logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 11, generator=generator) * 2
    teacher = torch.randn(2, 6, 11, generator=generator) * 2
    labels = torch.tensor([[-100, -100, 3, 5, 1, 2], [-100, 4, 4, 7, -100, -100]])
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_generalized_jsd_equals_trls_generalized_jsd_loss(gkd_logits, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = gkd_logits
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    mask = labels != -100
    per_token = gkd_losses.generalized_jsd(student, teacher, beta, temperature)
    assert per_token.shape == labels.shape
    ours = per_token[mask].sum() / mask.sum()
    assert float(ours) == pytest.approx(float(expected), abs=1e-5)


def test_generalized_jsd_ends_are_the_forward_and_reverse_kl():
    student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    s, t = torch.softmax(student, -1)[0].tolist(), torch.softmax(teacher, -1)[0].tolist()
    forward = sum(ti * math.log(ti / si) for si, ti in zip(s, t))
    reverse = sum(si * math.log(si / ti) for si, ti in zip(s, t))
    assert float(gkd_losses.generalized_jsd(student, teacher, 0.0)[0]) == pytest.approx(forward, abs=1e-6)
    assert float(gkd_losses.generalized_jsd(student, teacher, 1.0)[0]) == pytest.approx(reverse, abs=1e-6)
    m = [0.5 * si + 0.5 * ti for si, ti in zip(s, t)]
    jsd = 0.5 * sum(ti * math.log(ti / mi) for ti, mi in zip(t, m)) + 0.5 * sum(si * math.log(si / mi)
                                                                                 for si, mi in zip(s, m))
    assert float(gkd_losses.generalized_jsd(student, teacher, 0.5)[0]) == pytest.approx(jsd, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        gkd_losses.generalized_jsd(student, teacher, 1.5)
