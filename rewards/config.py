"""Configuration of the reward ensemble (weights per category, required experts); no torch here."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _paper_weights() -> dict[str, dict[str, float]]:
    return {
        "human": {"tier": 0.4, "ber": 0.2, "der": 0.2, "fer": 0.2},
        "animal": {"tier": 0.4, "ber": 0.3, "der": 0.3},
        "object": {"tier": 0.4, "ber": 0.3, "der": 0.3},
    }


@dataclass
class EnsembleConfig:
    """Ensemble weights per concept category."""

    weights: dict[str, dict[str, float]] = field(default_factory=_paper_weights)
    """category -> {expert name -> weight} (paper App. E: human .4/.2/.2/.2, animal/object .4/.3/.3; add
    ``unipercept: 0.1`` per category to opt in to the perceptual term, default 0)."""
    required: list[str] = field(default_factory=lambda: ["tier"])
    """Experts that may never be dropped (a sample whose required expert is unavailable is an error)."""

    def validate(self) -> None:
        """Weights are finite and >= 0, and every category has a positive total."""
        for cat, ws in self.weights.items():
            for name, w in ws.items():
                if not np.isfinite(w) or w < 0:
                    raise ValueError(f"ensemble: weights.{cat}.{name} = {w} must be finite and >= 0")
            if sum(ws.values()) <= 0:
                raise ValueError(f"ensemble: weights.{cat} has no positive weight")

    @property
    def experts(self) -> list[str]:
        """Every expert that has a positive weight in some category (sorted)."""
        return sorted({n for ws in self.weights.values() for n, w in ws.items() if w > 0})
