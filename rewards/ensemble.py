"""The reward ensemble: ``R = Σ_e w_e(category) · score_e`` (paper Eq. 12, App. E).

Weights per category: human (TIER .4, BER .2, DER .2, FER .2); animal / object (TIER .4, BER .3, DER .3).

UniPercept (perceptual IAA / IQA / ISTA, [0, 1] at its default ``scale``) is an opt-in extra term: its default weight
is 0 in every category, so the paper's ensemble is reproduced unchanged. Opting in (:func:`with_perceptual`, or
``weights.<category>.unipercept`` in YAML) *adds* ``w · UniPercept`` on top of the paper's four terms, which keep
their weights; :data:`PERCEPTUAL_WEIGHT` (0.1) is the suggested value (see the README for why).
When an optional expert is unavailable (dropped, its server down), its weight is removed and the remaining
weights of that sample are renormalised to the same total; each such sample is reported in
``EnsembleResult.notes`` and logged. A required expert missing, an unknown category, a score array of the
wrong shape or a non-finite score (from any expert, used or not) is an error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from rewards.base import NonFiniteScoreError, RewardExpert, ScoreBatch
from rewards.config import EnsembleConfig, _paper_weights

__all__ = ["EnsembleConfig", "EnsembleResult", "RewardEnsemble", "PERCEPTUAL_WEIGHT", "with_perceptual"]

log = logging.getLogger(__name__)


PERCEPTUAL_WEIGHT = 0.1
"""Suggested opt-in weight of the UniPercept term per category (added to the paper's total of 1.0)."""


def with_perceptual(weights: dict[str, dict[str, float]] | None = None,
                    weight: float | dict[str, float] = PERCEPTUAL_WEIGHT, expert: str = "unipercept"
                    ) -> dict[str, dict[str, float]]:
    """A copy of ``weights`` (default: the paper's) with the perceptual term added to every category; ``weight`` is
    one value for all categories or ``{category: weight}`` (missing categories get 0)."""
    base = {c: dict(ws) for c, ws in (weights or _paper_weights()).items()}
    for cat, ws in base.items():
        ws[expert] = float(weight.get(cat, 0.0) if isinstance(weight, dict) else weight)
    return base


@dataclass
class EnsembleResult:
    """The total reward with everything that went into it."""

    total: np.ndarray
    """float32 [B] ensemble reward."""
    per_expert: dict[str, np.ndarray]
    """expert name -> float32 [B] scores (0 where the expert has no weight for that sample)."""
    weights: dict[str, np.ndarray]
    """expert name -> float32 [B] effective (renormalised) weight used for each sample."""
    notes: list[str] = field(default_factory=list)
    """Human-readable notes, e.g. which samples were renormalised because an expert was dropped."""


class RewardEnsemble:
    """Combines per-expert scores with the category weights; optionally runs the experts itself."""

    def __init__(self, config: EnsembleConfig | None = None):
        self.config = config or EnsembleConfig()
        self.config.validate()

    def sample_weights(self, category: str, available: set[str]) -> tuple[dict[str, float], list[str]]:
        """Effective weights of one sample given the available experts, and the dropped ones."""
        if category not in self.config.weights:
            raise ValueError(f"ensemble: unknown category {category!r}; known: {sorted(self.config.weights)}")
        ws = {n: w for n, w in self.config.weights[category].items() if w > 0}
        dropped = sorted(n for n in ws if n not in available)
        required_missing = [n for n in dropped if n in self.config.required]
        if required_missing:
            raise ValueError(f"ensemble: required expert(s) {required_missing} unavailable for category "
                             f"{category!r}")
        kept = {n: w for n, w in ws.items() if n in available}
        if not kept:
            raise ValueError(f"ensemble: no available expert for category {category!r} (dropped {dropped})")
        if dropped:
            scale = sum(ws.values()) / sum(kept.values())
            kept = {n: w * scale for n, w in kept.items()}
        return kept, dropped

    def combine(self, per_expert: Mapping[str, np.ndarray], categories: list[str],
                available: set[str] | None = None) -> EnsembleResult:
        """Weighted total per sample. ``available`` defaults to the experts present in ``per_expert``;
        an expert with a weight for a sample but not available is dropped and the rest renormalised."""
        n = len(categories)
        if n == 0:
            raise ValueError("ensemble: empty batch (no categories)")
        avail = set(per_expert) if available is None else set(available) & set(per_expert)
        scores: dict[str, np.ndarray] = {}
        for name, arr in per_expert.items():
            a = np.asarray(arr, dtype=np.float32)
            if a.shape != (n,):
                raise ValueError(f"ensemble: scores of {name!r} have shape {a.shape}, expected ({n},)")
            bad = np.flatnonzero(~np.isfinite(a))
            if bad.size:
                raise NonFiniteScoreError(f"ensemble: expert {name!r} gave non-finite score(s) {a[bad].tolist()} "
                                          f"at sample(s) {bad.tolist()}")
            scores[name] = a
        total = np.zeros(n, dtype=np.float64)
        eff = {name: np.zeros(n, dtype=np.float32) for name in self.config.experts if name in scores}
        notes: list[str] = []
        for i, cat in enumerate(categories):
            ws, dropped = self.sample_weights(cat, avail)
            if dropped:
                notes.append(f"sample {i} ({cat}): dropped {dropped}, renormalised {sorted(ws)} to "
                             f"{ {k: round(v, 4) for k, v in ws.items()} }")
            for name, w in ws.items():
                total[i] += w * scores[name][i]
                eff[name][i] = w
        for note in notes:
            log.warning("reward ensemble: %s", note)
        return EnsembleResult(total=total.astype(np.float32), per_expert=scores, weights=eff, notes=notes)

    def score(self, experts: Mapping[str, RewardExpert], batch: ScoreBatch, categories: list[str],
              expert_batches: Mapping[str, ScoreBatch] | None = None) -> EnsembleResult:
        """Run each expert on the samples that weight it (e.g. FER on humans only), then :meth:`combine`.

        Experts missing from ``experts`` count as unavailable (optional ones are renormalised away); an expert
        that weights no sample of this batch (e.g. CLIP kept only as the DSOG screen) is not run or reported.
        ``expert_batches`` gives some experts their own batch of the same length (TIER scores the answer IR, the
        image experts the generation prompt).
        """
        batch.validate()
        if len(categories) != len(batch):
            raise ValueError(f"ensemble: {len(categories)} categories for a batch of {len(batch)}")
        per_expert: dict[str, np.ndarray] = {}
        for name, expert in experts.items():
            rows = [i for i, c in enumerate(categories) if self.config.weights.get(c, {}).get(name, 0) > 0]
            if not rows:
                continue
            src = (expert_batches or {}).get(name, batch)
            if len(src) != len(batch):
                raise ValueError(f"ensemble: expert_batches[{name!r}] has {len(src)} samples, expected {len(batch)}")
            out = np.zeros(len(batch), dtype=np.float32)
            out[rows] = expert.score(src if len(rows) == len(src) else src.select(rows))
            per_expert[name] = out
        return self.combine(per_expert, categories)
