"""The rollout side of rewards: the DSOG screen and the ensemble reward of finished samples.

:class:`RewardScorer` turns rollout outputs into :class:`rewards.base.ScoreBatch` es — the image experts (BER,
DER, FER, CLIP) see the generated images with the generation prompt (D8), TIER sees the answer IR with the
extra_info candidates — and sends them to a backend: :class:`actors.serving.client.RewardClient` (Ray Serve, the
service's path) or :class:`LocalRewardBackend` (the same experts in-process, for tests and benchmarks).
"""
from __future__ import annotations

import logging

import numpy as np

from rewards.base import ScoreBatch
from rewards.ensemble import RewardEnsemble

log = logging.getLogger(__name__)

TEXT_EXPERTS = ("tier",)
"""Experts that score the answer IR instead of the image."""


class LocalRewardBackend:
    """In-process experts with the RewardClient calling convention (no retries: errors propagate).

    ``experts`` may include experts without ensemble weight (e.g. CLIP as the DSOG screen); ``score_all`` uses
    only those the ensemble weights."""

    def __init__(self, experts: dict, ensemble: RewardEnsemble):
        self.experts = experts
        self.ensemble = ensemble

    def score_expert(self, expert: str, batch: ScoreBatch) -> np.ndarray:
        """One expert's scores."""
        return self.experts[expert].score(batch)

    def score_all(self, batch: ScoreBatch, categories: list[str], expert_batches: dict | None = None):
        """Per-expert scores (each on the rows its category weights), total, dropped (always empty here)."""
        from actors.serving.client import RewardResult

        ens = self.ensemble.score(self.experts, batch, categories, expert_batches)
        return RewardResult(per_expert=ens.per_expert, total=ens.total, weights=ens.weights, notes=ens.notes)


class RewardScorer:
    """Implements the rollout engine's ``Scorer`` protocol over a reward backend."""

    def __init__(self, backend, screen_expert: str):
        self.backend = backend
        self.screen_expert = screen_expert
        self.last_result = None
        """The last :meth:`score` call's full result (failures, notes) for metrics."""

    def screen(self, images: np.ndarray, texts: list[str], concepts: list[str]) -> np.ndarray:
        """DSOG screen scores of preview images (BER by default, CLIP 0.65·I + 0.35·T as option; D6)."""
        batch = ScoreBatch(images=np.ascontiguousarray(images), texts=list(texts), concepts=list(concepts))
        return np.asarray(self.backend.score_expert(self.screen_expert, batch), dtype=np.float32)

    def score(self, images, texts, concepts, categories, answers, candidates, targets):
        """(per-expert scores, total, dropped experts) of finished samples."""
        image_batch = ScoreBatch(images=np.ascontiguousarray(images), texts=list(texts), concepts=list(concepts))
        text_batch = ScoreBatch(texts=list(answers), candidates=[list(c) for c in candidates],
                                targets=[int(t) for t in targets])
        result = self.backend.score_all(image_batch, list(categories),
                                        expert_batches={name: text_batch for name in TEXT_EXPERTS})
        self.last_result = result
        return result.per_expert, result.total, list(result.dropped)


def serve_scorer(cfg) -> RewardScorer:
    """The service's scorer: Ray Serve deployments through a RewardClient."""
    from actors.serving.client import RewardClient

    return RewardScorer(RewardClient(cfg.serve), cfg.dsog.scorer)


def local_scorer(cfg, dataset) -> RewardScorer:
    """In-process experts built from ``cfg.serve`` with the dataset's references (tests, benchmarks)."""
    from rewards.registry import build_expert

    ensemble = RewardEnsemble(cfg.serve.ensemble)
    names = sorted(set(cfg.serve.enabled) | {cfg.dsog.scorer})
    experts = {}
    for name in names:
        ecfg = cfg.serve.expert(name)   # an expert with its own interpreter (UniPercept) runs there, over a pipe
        expert = build_expert(name, ecfg.expert_config(name), python=ecfg.interpreter(name) or None)
        if expert.uses_references:
            for cname, concept in dataset.concepts.items():
                if name == "fer" and concept.info.category != "human":
                    continue
                expert.add_reference(cname, [ref.load() for ref in concept.train.references])
        experts[name] = expert
    return RewardScorer(LocalRewardBackend(experts, ensemble), cfg.dsog.scorer)
