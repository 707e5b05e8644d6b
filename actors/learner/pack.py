"""Several replay units in one forward pass (``learner.units_per_forward``): the learner's throughput lever.

A rank's unit list (``learner_step.schedule_units``) is cut into *packs*: up to k consecutive image units (several
MaskGIT steps of one sample, or the same step of several samples, depending on how the units were dealt) run as
ONE batched forward of the CFG code logits, and one backward of the packed loss Σ_j w_j·ℓ_j. Answer units (different
lengths) stay one per forward. Every rank holds the same kinds at the same positions and the same number of units,
so every rank gets the same number of packs of the same kinds (the D12 alignment ZeRO-2 needs still holds).

The packed loss is the sum of the unit losses, so the gradient is the unit-by-unit gradient up to float rounding
(tests/test_replay_pack.py). Backends that can batch (``ShowoBackend.pack_loss``) do; others run the pack's units
one after another inside the same forward call (:func:`sequential_loss`). Cost: the activations of k units are alive at once (memory grows ~linearly in k).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["pack_units", "pack_loss", "sequential_loss", "stack_t2i"]


def pack_units(units: Sequence[Any], k: int) -> list[list[Any]]:
    """Cut a rank's units into packs: up to ``k`` consecutive image units; every answer unit alone."""
    if int(k) < 1:
        raise ValueError(f"learner.units_per_forward must be >= 1, got {k}")
    packs: list[list[Any]] = []
    cur: list[Any] = []
    for u in units:
        if u.kind != "image" or k == 1:
            if cur:
                packs.append(cur)
                cur = []
            packs.append([u])
            continue
        cur.append(u)
        if len(cur) == k:
            packs.append(cur)
            cur = []
    if cur:
        packs.append(cur)
    return packs


def pack_loss(backend: Any, module: nn.Module, samples: Sequence[Any], pack: Sequence[Any],
              num_samples: int) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """(Σ_j w_j·loss_j with grad, stats of the real units) of one pack, in one forward call.

    Uses ``backend.pack_loss`` when the backend batches packs itself, else sums ``backend.unit_loss`` per unit."""
    if len(pack) > 1 and hasattr(backend, "pack_loss"):
        return backend.pack_loss(module, samples, pack, num_samples)
    return sequential_loss(backend, module, samples, pack, num_samples)


def stack_t2i(batches: list) -> Any:
    """One T2IBatch holding the cond rows of every batch, then their uncond rows (the CFG layout); None when the
    batches' sequence layouts differ (then the units run one after another)."""
    from backbone.maskgit import T2IBatch

    b0 = batches[0]
    if any(b.ids.shape[1] != b0.ids.shape[1] or b.prefix_len != b0.prefix_len for b in batches):
        return None
    b = b0.ids.shape[0] // (2 if b0.cfg else 1)   # samples per cached batch (1)
    halves = [slice(0, b), slice(b, 2 * b)] if b0.cfg else [slice(0, b)]
    ids = torch.cat([x.ids[h] for h in halves for x in batches])
    mask = torch.cat([x.mask[h] for h in halves for x in batches])
    return T2IBatch(ids=ids, mask=mask, prefix_len=b0.prefix_len, num_image_tokens=b0.num_image_tokens, cfg=b0.cfg)


def sequential_loss(backend: Any, module: nn.Module, samples: Sequence[Any], pack: Sequence[Any],
                    num_samples: int) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Fallback: the pack's units one after another inside the same forward call."""
    total, stats = None, []
    for u in pack:
        loss, st = backend.unit_loss(module, samples, u, num_samples)
        total = loss * float(u.weight) if total is None else total + loss * float(u.weight)
        if u.weight > 0:
            stats.append(st)
    return total, stats
