"""Placement configuration of the learner and rollout roles (split or colocated)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlacementConfig:
    """How learner and rollout actors are laid out on the cluster."""

    layout: str = "split"
    """Layout: split (own bundles per role) or colocated (learner rank and rollout actors share a bundle's GPU)."""
    strategy: str = "PACK"
    """Ray placement-group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD."""
    learner_gpu_share: float = 0.5
    """colocated: fraction of a shared bundle's GPU given to the learner rank (rollout actors split the rest)."""
    ready_timeout_s: float = 300.0
    """Wait at most this long for the placement groups to be scheduled."""

    @classmethod
    def tiny(cls) -> "PlacementConfig":
        """CPU test values: short wait."""
        return cls(ready_timeout_s=30.0)
