"""The UniCTask-GRPO objective: Dr.GRPO advantages and the clipped, KL-regularised per-token loss (D2–D5).

Per token (an IR text token, or one image position at one MaskGIT step):

    r  = exp(clamp(logp - old_logp, ±c))
    ℓ  = -min(r·A, clip(r, 1-ε, 1+ε)·A) + β·KL_k3,   KL_k3 = exp(ref - logp) - (ref - logp) - 1

Aggregation (D5), with constants only, never per-sample lengths:

    loss = (1/S) Σ_samples [ α_und·Σ_text ℓ / L_text  +  α_gen·Σ_image ℓ / (T·N) ]

where S = ``num_samples`` (the number of samples the batch mean runs over, across all learner ranks),
L_text = ``max_answer_tokens`` and T·N = MaskGIT steps × image tokens. With the "newly_unmasked" image
option each position enters once per trajectory, so the image normaliser is N.

:func:`image_step_loss` is the contribution of ONE MaskGIT step of B samples, so the learner can replay a
trajectory step by step and call ``backward`` per step; the accumulated gradient equals the gradient of the
full loss. D4: with one update per batch, pass ``old_logp=None`` (= ``logp.detach()``): the ratio is 1 in
value and its gradient is the policy gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rl.grpo.config import ObjectiveConfig

__all__ = ["ObjectiveConfig", "group_advantages", "per_token_loss", "image_step_loss", "answer_loss",
           "newly_unmasked_positions", "merge_stats"]


def group_advantages(rewards: Any) -> Any:
    """Dr.GRPO advantages A = R - mean(R over the group), no std division.

    ``rewards``: [P, G] (P groups of G samples) or [G] (one group), numpy or torch; returns the same type,
    shape and float dtype. Raises ValueError on non-finite rewards or an empty group.
    """
    is_torch = isinstance(rewards, torch.Tensor)
    r = rewards if is_torch else np.asarray(rewards, dtype=np.float64)
    if r.ndim not in (1, 2) or r.shape[-1] == 0:
        raise ValueError(f"group_advantages: expected rewards [P, G] or [G] with G >= 1, got {tuple(r.shape)}")
    finite = torch.isfinite(r).all().item() if is_torch else bool(np.isfinite(r).all())
    if not finite:
        raise ValueError("group_advantages: rewards contain NaN/inf")
    if is_torch:
        r = r if r.is_floating_point() else r.double()
        return r - r.mean(dim=-1, keepdim=True)
    return r - r.mean(axis=-1, keepdims=True)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                   adv: torch.Tensor, cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """Elementwise ℓ and its parts. ``adv`` broadcasts against ``logp`` (e.g. [B, 1] vs [B, K]).

    Returns dict with ``loss`` (ℓ, with grad), and detached ``ratio``, ``kl`` and ``clipped`` (bool: the
    clip is active, i.e. r > 1+ε with A > 0 or r < 1-ε with A < 0).
    """
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    c = cfg.logratio_clamp
    ratio = torch.exp(torch.clamp(logp - old, -c, c))
    clipped_ratio = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    loss = -surrogate
    if cfg.kl_beta > 0:
        if ref_logp is None:
            raise ValueError("per_token_loss: ref_logp is required when ObjectiveConfig.kl_beta > 0")
        d = torch.clamp(ref_logp.to(logp.dtype) - logp, -c, c)
        kl = torch.exp(d) - d - 1.0
        loss = loss + cfg.kl_beta * kl
    else:
        kl = torch.zeros_like(logp)
    with torch.no_grad():
        clipped = ((ratio > 1.0 + cfg.clip_eps) & (adv > 0)) | ((ratio < 1.0 - cfg.clip_eps) & (adv < 0))
    return {"loss": loss, "ratio": ratio.detach(), "kl": kl.detach(), "clipped": clipped}


def _as_adv(adv: Any, batch: int, like: torch.Tensor, fn: str) -> torch.Tensor:
    a = torch.as_tensor(adv, dtype=like.dtype, device=like.device).detach()
    if a.shape != (batch,):
        raise ValueError(f"{fn}: adv must have shape [B] = ({batch},), got {tuple(a.shape)}")
    return a[:, None]


def _check_same(fn: str, name: str, t: torch.Tensor | None, shape: torch.Size) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"{fn}: {name} shape {tuple(t.shape)} != logp shape {tuple(shape)}")


def _stats(parts: dict[str, torch.Tensor], weight: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked means of the diagnostics (detached 0-d tensors; no host sync)."""
    n = weight.sum()
    denom = n.clamp(min=1)
    return {
        "loss": loss.detach(),
        "tokens": n,
        "clip_frac": (parts["clipped"].to(weight.dtype) * weight).sum() / denom,
        "kl_mean": (parts["kl"] * weight).sum() / denom,
        "ratio_mean": (parts["ratio"] * weight).sum() / denom,
    }


def image_step_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    adv: Any, T: int, N: int, num_samples: int, cfg: ObjectiveConfig,
                    position_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Contribution of ONE MaskGIT step of B samples to the total loss: α_gen·Σ ℓ / (norm · num_samples).

    logp / old_logp / ref_logp: [B, N] log-probs of the chosen codes at this step (old None = D4 on-policy;
    ref may be None only when kl_beta == 0). adv: [B]. T, N: steps and image tokens of the trajectory
    (the constant normaliser is T·N, or N with image_positions="newly_unmasked"). num_samples: samples
    the batch mean runs over (all ranks). position_mask: optional bool/float [B, N]; required with
    "newly_unmasked" (see :func:`newly_unmasked_positions`); with "all" it may zero out padding units.
    Summing this over the T steps of every sample equals the image part of the D5 loss.
    """
    fn = "image_step_loss"
    if logp.ndim != 2 or logp.shape[1] != N:
        raise ValueError(f"{fn}: logp must be [B, N={N}], got {tuple(logp.shape)}")
    if T < 1 or N < 1 or num_samples < 1:
        raise ValueError(f"{fn}: T, N, num_samples must be >= 1, got {T}, {N}, {num_samples}")
    _check_same(fn, "old_logp", old_logp, logp.shape)
    _check_same(fn, "ref_logp", ref_logp, logp.shape)
    _check_same(fn, "position_mask", position_mask, logp.shape)
    if cfg.image_positions == "newly_unmasked":
        if position_mask is None:
            raise ValueError(f"{fn}: image_positions='newly_unmasked' needs position_mask "
                             "(see newly_unmasked_positions)")
        norm = float(N)
    else:
        norm = float(T * N)
    a = _as_adv(adv, logp.shape[0], logp, fn)
    parts = per_token_loss(logp, old_logp, ref_logp, a, cfg)
    w = torch.ones_like(logp) if position_mask is None else position_mask.to(logp.dtype)
    loss = cfg.alpha_gen * (parts["loss"] * w).sum() / (norm * num_samples)
    return loss, _stats(parts, w.detach(), loss)


def answer_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                mask: torch.Tensor, adv: Any, num_samples: int,
                cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The IR text-token part of the loss: α_und·Σ_{valid tokens} ℓ / (L_text · num_samples).

    logp / old_logp / ref_logp: [B, M] log-probs of the answer tokens (D3: of the distribution they were
    drawn from); mask: bool [B, M] valid (non-pad) tokens; adv: [B]. L_text = cfg.max_answer_tokens is a
    constant: the loss does not depend on how many tokens an answer has beyond the sum itself. A row with
    more than L_text valid tokens is a config mismatch and raises ValueError.
    """
    fn = "answer_loss"
    if logp.ndim != 2:
        raise ValueError(f"{fn}: logp must be [B, M], got {tuple(logp.shape)}")
    if num_samples < 1:
        raise ValueError(f"{fn}: num_samples must be >= 1, got {num_samples}")
    _check_same(fn, "old_logp", old_logp, logp.shape)
    _check_same(fn, "ref_logp", ref_logp, logp.shape)
    _check_same(fn, "mask", mask, logp.shape)
    w = mask.to(logp.dtype)
    if logp.shape[1] > cfg.max_answer_tokens and bool((w.sum(dim=1) > cfg.max_answer_tokens).any()):
        raise ValueError(f"{fn}: an answer has more than ObjectiveConfig.max_answer_tokens="
                         f"{cfg.max_answer_tokens} valid tokens; set it to the generator's max_new_tokens")
    a = _as_adv(adv, logp.shape[0], logp, fn)
    parts = per_token_loss(logp, old_logp, ref_logp, a, cfg)
    loss = cfg.alpha_und * (parts["loss"] * w).sum() / (float(cfg.max_answer_tokens) * num_samples)
    return loss, _stats(parts, w.detach(), loss)


def newly_unmasked_positions(states: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Bool mask of the positions fixed at each MaskGIT step, same shape as ``states`` ([..., T, N]).

    ``states[..., t, :]`` is the image block before step t; a position is newly fixed at step t if it is
    masked before step t and not before step t+1. At the last step every still-masked position counts
    (the final grid fills all of them).
    """
    masked = states == mask_id
    after = torch.zeros_like(masked)
    after[..., :-1, :] = masked[..., 1:, :]
    return masked & ~after


def merge_stats(stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Combine per-call stats into floats: losses summed, diagnostics token-weighted means."""
    if not stats:
        return {}
    n = sum(float(s["tokens"]) for s in stats)
    out = {"loss": sum(float(s["loss"]) for s in stats), "tokens": n}
    for k in ("clip_frac", "kl_mean", "ratio_mean"):
        out[k] = sum(float(s[k]) * float(s["tokens"]) for s in stats) / max(n, 1.0)
    return out
