"""UniPercept columns of the evaluation: IAA / IQA / ISTA (0-100) of every concept's generated images.

Computed when ``serve.enabled`` includes ``unipercept``: the expert is built from ``serve.unipercept`` (preset,
overrides) in its own interpreter (``serve.unipercept.python``, the overlay environment) and driven over a pipe,
so the evaluating process keeps its own transformers. Each generation item gets its three scores; the concept's
metrics ``iaa`` / ``iqa`` / ``ista`` are the means over all its generated images (Pure Gen., Rea. Gen., Dense).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["PERCEPTUAL_KEYS", "build_perceptual_scorer", "perceptual_metrics"]

PERCEPTUAL_KEYS = ("iaa", "iqa", "ista")
"""Metric keys (the UniPercept dimensions)."""


def build_perceptual_scorer(cfg, device: Any = None):
    """The UniPercept expert for evaluation, or None when ``serve.enabled`` does not include it."""
    serve = getattr(cfg, "serve", None)
    if serve is None or "unipercept" not in serve.enabled:
        return None
    from rewards.registry import build_expert

    ecfg = serve.unipercept
    config = ecfg.expert_config("unipercept")
    if device is not None:
        config = dataclasses.replace(config, device=str(device))
    return build_expert("unipercept", config, python=ecfg.interpreter("unipercept") or None)


def perceptual_metrics(scorer, images: np.ndarray, gen: list[dict]) -> dict[str, float | None]:
    """``{"iaa", "iqa", "ista"}`` means over ``images`` (uint8 [N,H,W,3]); each ``gen[i]`` gets its own scores."""
    if scorer is None or len(images) == 0:
        return {k: None for k in PERCEPTUAL_KEYS}
    dims = scorer.dimension_scores(list(images))
    for i, g in enumerate(gen):
        g.update({k: float(dims[k][i]) for k in PERCEPTUAL_KEYS if k in dims})
    return {k: float(np.mean(dims[k])) if k in dims else None for k in PERCEPTUAL_KEYS}
