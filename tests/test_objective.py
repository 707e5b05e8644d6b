"""Dr.GRPO objective: hand computations, normalisers, advantages, per-step accumulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl.grpo.config import ObjectiveConfig
from rl.grpo.objective import (
    answer_loss,
    group_advantages,
    image_step_loss,
    merge_stats,
    newly_unmasked_positions,
    per_token_loss,
)


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, restoring the global default afterwards."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


def cfg(**kw) -> ObjectiveConfig:
    return ObjectiveConfig(**kw)


def test_defaults_and_validation():
    c = ObjectiveConfig()
    assert (c.clip_eps, c.kl_beta, c.alpha_und, c.alpha_gen, c.max_answer_tokens, c.logratio_clamp,
            c.image_positions) == (0.2, 0.01, 0.4, 0.6, 100, 10.0, "all")
    assert ObjectiveConfig.tiny().max_answer_tokens != c.max_answer_tokens
    with pytest.raises(ValueError, match="image_positions"):
        ObjectiveConfig(image_positions="some")
    with pytest.raises(ValueError, match="clip_eps"):
        ObjectiveConfig(clip_eps=0)


def test_group_advantages_zero_sum_numpy_and_torch():
    r = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    a = group_advantages(r)
    np.testing.assert_allclose(a, [[-1, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(a.sum(axis=1), 0, atol=1e-12)
    rt = torch.rand(4, 9)
    at = group_advantages(rt)
    assert isinstance(at, torch.Tensor) and torch.allclose(at.sum(1), torch.zeros(4), atol=1e-6)
    # no std division
    np.testing.assert_allclose(group_advantages(np.array([0.0, 10.0])), [-5.0, 5.0])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(np.array([[1.0, np.nan]]))


def test_on_policy_ratio_one_and_policy_gradient():
    """D4: old = logp.detach() -> ratio 1, loss value -A, gradient = -A·∇logp."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = per_token_loss(logp, None, None, torch.tensor([[0.5]]), cfg(kl_beta=0.0))
    assert torch.allclose(out["ratio"], torch.ones(1, 2))
    assert torch.allclose(out["loss"], torch.full((1, 2), -0.5))
    out["loss"].sum().backward()
    assert torch.allclose(logp.grad, torch.full((1, 2), -0.5))


def test_clipping_both_sides_hand_computed():
    c = cfg(kl_beta=0.0, clip_eps=0.2)
    old = torch.zeros(1, 4)
    # ratios: 1.5, 0.5, 1.5, 0.5 ; A = +1 for first two, -1 for last two (as separate rows)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    out = per_token_loss(logp, old, None, adv, c)
    # A>0: min(1.5, 1.2)=1.2 (clipped); min(0.5, 0.8)=0.5 (not clipped)
    # A<0: min(-1.5, -1.2)=-1.5 (not clipped); min(-0.5, -0.8)=-0.8 (clipped)
    assert torch.allclose(out["loss"], torch.tensor([[-1.2, -0.5, 1.5, 0.8]]))
    assert out["clipped"].tolist() == [[True, False, False, True]]
    out["loss"].sum().backward()
    # clipped tokens carry no gradient; others d(-r·A)/dlogp = -r·A
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0]]))


def test_kl_k3_value():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    out = per_token_loss(logp, None, ref, torch.tensor([[0.0]]), cfg(kl_beta=0.01))
    d = -0.5
    expected = math.exp(d) - d - 1
    assert out["kl"].item() == pytest.approx(expected)
    assert out["loss"].item() == pytest.approx(0.01 * expected)
    with pytest.raises(ValueError, match="ref_logp"):
        per_token_loss(logp, None, None, torch.tensor([[0.0]]), cfg(kl_beta=0.01))


def test_logratio_clamp():
    out = per_token_loss(torch.tensor([[50.0]]), torch.tensor([[0.0]]), None, torch.tensor([[1.0]]),
                         cfg(kl_beta=0.0, clip_eps=100.0))
    assert out["ratio"].item() == pytest.approx(math.exp(10.0))


def test_answer_loss_constant_normaliser_and_alpha():
    c = cfg(kl_beta=0.0, max_answer_tokens=10, alpha_und=0.4)
    logp = torch.zeros(2, 6)
    adv = torch.tensor([1.0, 1.0])
    short = torch.zeros(2, 6, dtype=torch.bool)
    short[:, :2] = True
    long = torch.ones(2, 6, dtype=torch.bool)
    l_short, st = answer_loss(logp, None, None, short, adv, num_samples=2, cfg=c)
    l_long, _ = answer_loss(logp, None, None, long, adv, num_samples=2, cfg=c)
    # each valid token contributes -A = -1; normaliser L_text=10 and 2 samples, never the mask length
    assert l_short.item() == pytest.approx(0.4 * (-4) / (10 * 2))
    assert l_long.item() == pytest.approx(0.4 * (-12) / (10 * 2))
    assert l_long.item() / l_short.item() == pytest.approx(3.0)
    assert float(st["tokens"]) == 4 and float(st["ratio_mean"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        answer_loss(torch.zeros(1, 12), None, None, torch.ones(1, 12, dtype=torch.bool), [1.0], 1, c)


def test_image_step_loss_normaliser_and_alpha():
    c = cfg(kl_beta=0.0, alpha_gen=0.6)
    T, N = 5, 4
    logp = torch.zeros(3, N)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = image_step_loss(logp, None, None, adv, T, N, num_samples=3, cfg=c)
    assert loss.item() == pytest.approx(0.6 * (-(1.0 - 2.0 + 0.5) * N) / (T * N * 3))
    assert float(st["clip_frac"]) == 0.0
    # newly_unmasked option: needs a mask; constant normaliser N
    cn = cfg(kl_beta=0.0, image_positions="newly_unmasked")
    with pytest.raises(ValueError, match="position_mask"):
        image_step_loss(logp, None, None, adv, T, N, 3, cn)
    m = torch.zeros(3, N, dtype=torch.bool)
    m[:, 0] = True
    loss_n, _ = image_step_loss(logp, None, None, adv, T, N, 3, cn, position_mask=m)
    assert loss_n.item() == pytest.approx(0.6 * (-(1.0 - 2.0 + 0.5)) / (N * 3))
    with pytest.raises(ValueError, match="adv"):
        image_step_loss(logp, None, None, torch.ones(2), T, N, 3, c)


def test_equal_group_gives_zero_advantage_gradient():
    rewards = np.full((1, 4), 0.7)
    adv = torch.as_tensor(group_advantages(rewards)[0])
    theta = torch.randn(4, 6, requires_grad=True)
    logp = torch.log_softmax(theta, dim=-1)
    loss, _ = image_step_loss(logp, None, None, adv, 1, 6, 4, cfg(kl_beta=0.0))
    loss.backward()
    assert torch.count_nonzero(theta.grad) == 0
    # with KL the gradient is exactly the KL gradient
    theta.grad = None
    ref = torch.log_softmax(torch.randn(4, 6), dim=-1)
    c = cfg(kl_beta=0.01)
    loss, _ = image_step_loss(torch.log_softmax(theta, -1), None, ref, adv, 1, 6, 4, c)
    loss.backward()
    g1 = theta.grad.clone()
    theta.grad = None
    lp = torch.log_softmax(theta, -1)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    (0.6 * 0.01 * kl.sum() / (6 * 4)).backward()
    assert torch.allclose(g1, theta.grad)


def _policy_logps(theta: torch.Tensor, chosen: torch.Tensor, t: int) -> torch.Tensor:
    """Tiny "policy": per-step logits theta[t] [N, K] shared by the batch; log-prob of chosen [B, N]."""
    logits = theta[t] * (1.0 + 0.1 * t)
    lp = torch.log_softmax(logits, dim=-1)  # [N, K]
    return lp.gather(1, chosen.T).T  # [B, N]


def test_per_step_accumulation_equals_full_loss():
    torch.manual_seed(0)
    B, T, N, K = 3, 4, 5, 7
    theta = torch.randn(T, N, K, requires_grad=True)
    chosen = torch.randint(0, K, (B, T, N))
    ref = torch.randn(T, B, N).clamp(max=0) - 1.0
    old = torch.randn(T, B, N) * 0.1  # off-policy so clipping is exercised
    adv = torch.tensor([0.7, -0.3, -0.4])
    c = cfg(kl_beta=0.05)
    # per step, backward each step
    stats = []
    for t in range(T):
        lp = _policy_logps(theta, chosen[:, t], t)
        loss, st = image_step_loss(lp, lp.detach() + old[t], ref[t], adv, T, N, B, c)
        loss.backward()
        stats.append(st)
    g_steps = theta.grad.clone()
    theta.grad = None
    # full computation: one graph over all steps, D5 formula written out
    lps = torch.stack([_policy_logps(theta, chosen[:, t], t) for t in range(T)], dim=1)  # [B,T,N]
    olds = lps.detach() + old.permute(1, 0, 2)
    refs = ref.permute(1, 0, 2)
    ratio = torch.exp(lps - olds)
    a = adv[:, None, None]
    surr = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    kl = torch.exp(refs - lps) - (refs - lps) - 1
    per_sample = (0.6 * (-surr + 0.05 * kl).sum(dim=(1, 2)) / (T * N))
    per_sample.mean().backward()
    assert torch.allclose(g_steps, theta.grad, atol=1e-12)
    merged = merge_stats(stats)
    assert merged["loss"] == pytest.approx(per_sample.mean().item())
    assert merged["tokens"] == T * B * N and 0 < merged["clip_frac"] < 1


def test_newly_unmasked_positions():
    M = 9
    states = torch.tensor([[M, M, M], [1, M, M], [1, M, 2]])
    got = newly_unmasked_positions(states, M)
    assert got.tolist() == [[True, False, False], [False, False, True], [False, True, False]]
    assert got.sum(0).tolist() == [1, 1, 1]
