"""Log-prob replay for the learner (with gradients), through the same code paths as the rollout.

- :func:`image_step_logprobs`: one MaskGIT step's per-position log-probs of the chosen code ids from the stored
  state, CFG ``(1+s)·cond − s·uncond`` with **both branches under gradient** (design D2), sliced ``lm_head`` code
  rows, fp32 ``log_softmax``. Callers backward per step and accumulate (never all T graphs at once).
- :class:`PrefixKV`: optional speed lever for the learner. The text prefix's K/V are computed once with gradient,
  handed to every step as leaf tensors whose ``.grad`` accumulates, and back-propagated into the weights once at the
  end (:meth:`PrefixKV.backward`); nothing is silently detached (D2).
- :func:`answer_logprobs` (re-exported from :mod:`backbone.answer`): teacher-forced answer log-probs with the
  rollout's temperature / top-k definition (D3).
- :func:`newly_unmasked`: the option "newly unmasked positions only" as a ``[B,T,N]`` mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backbone.answer import answer_logprobs, answer_mask  # noqa: F401  (re-export for the learner)
from backbone.maskgit import T2IBatch, cfg_code_logits, compute_prefix_kv, make_t2i_batch
from backbone.phi import KV


def as_t2i_batch(tok, t2i, guidance_scale: float, device=None) -> T2IBatch:
    """Accept T2IInputs (builds the cond/uncond batch and masks) or an already built :class:`T2IBatch`."""
    if isinstance(t2i, T2IBatch):
        if t2i.cfg != (guidance_scale > 0):
            raise ValueError(f"T2IBatch built with cfg={t2i.cfg} but guidance_scale={guidance_scale}")
        return t2i
    return make_t2i_batch(tok, t2i, guidance_scale, device=device)


def image_step_logprobs(model, tok, t2i, state_ids: torch.Tensor, chosen: torch.Tensor, guidance_scale: float,
                        prefix_kv: PrefixKV | list[KV] | None = None) -> torch.Tensor:
    """fp32 ``[B,N]`` log-probs of ``chosen`` (code ids) at every position for the image state ``state_ids``
    (input ids, mask id where masked), under the CFG code policy; differentiable w.r.t. the model (both branches).

    ``t2i``: T2IInputs or a :class:`T2IBatch` (build it once per sample and reuse it over the T steps).
    ``prefix_kv``: None = full-sequence forward; a :class:`PrefixKV` (or K/V list) = image block only."""
    dev = model.device
    batch = as_t2i_batch(tok, t2i, guidance_scale, device=dev)
    kv = prefix_kv.leaves if isinstance(prefix_kv, PrefixKV) else prefix_kv
    logits = cfg_code_logits(model, tok, batch, state_ids.to(dev), guidance_scale, prefix_kv=kv)
    return torch.log_softmax(logits, dim=-1).gather(-1, chosen.to(dev).long()[..., None])[..., 0]


@dataclass
class PrefixKV:
    """Text-prefix K/V computed once with gradient, exposed as leaves for the per-step replays.

    Usage: ``pk = PrefixKV.compute(model, batch)``; for each step ``image_step_logprobs(..., prefix_kv=pk)`` then
    ``loss_k.backward()`` (leaf grads accumulate); finally ``pk.backward()`` pushes the accumulated K/V gradients
    through the prefix graph into the weights, once."""

    leaves: list[KV]
    """Detached copies with ``requires_grad=True``: pass these to the step forwards."""
    graph: list[KV] | None
    """The K/V tensors still attached to the prefix forward graph (None when computed without grad)."""

    @classmethod
    def compute(cls, model, batch: T2IBatch) -> PrefixKV:
        """Run the prefix forward (grad enabled if the caller enabled it) and make leaf copies."""
        kv = compute_prefix_kv(model, batch)
        if not torch.is_grad_enabled() or not kv[0][0].requires_grad:
            return cls(leaves=kv, graph=None)
        leaves = [(k.detach().requires_grad_(True), v.detach().requires_grad_(True)) for k, v in kv]
        return cls(leaves=leaves, graph=kv)

    def backward(self) -> None:
        """Back-propagate the leaves' accumulated gradients through the prefix forward (call once, at the end)."""
        if self.graph is None:
            return
        outs, grads = [], []
        for (k, v), (lk, lv) in zip(self.graph, self.leaves):
            for t, leaf in ((k, lk), (v, lv)):
                if leaf.grad is not None:
                    outs.append(t)
                    grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)
        self.graph = None


def newly_unmasked(states: torch.Tensor, mask_id: int) -> torch.Tensor:
    """bool ``[B,T,N]``: positions masked in the state before step t that are fixed after it (at the last step
    every still-masked position counts, since the returned grid fills them all)."""
    masked = states == mask_id
    after = torch.zeros_like(masked)
    after[:, :-1] = masked[:, 1:]
    return masked & ~after
