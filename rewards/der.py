"""DER, the DINOv2 Evaluation Reward: subject fidelity of a generated image to the concept's references.

``DER = mean_r cosine(f(generated), f(reference_r))`` (D8) where ``f`` is the DINOv2 CLS token of the last
layer (``last_hidden_state[:, 0]``, after the final LayerNorm) or, with ``pooling: patch_mean``, the mean of the
patch tokens. Reference features are computed once per concept. Preprocessing follows the DINOv2 image
processor: shorter side 256 (bicubic), center crop 224, ImageNet mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rewards.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExpertConfig,
    ImageSpec,
    RewardExpert,
    ScoreBatch,
    cosine,
    loading,
    preprocess_images,
    resolve_weights,
    seeded,
)

__all__ = ["DerConfig", "DerExpert", "DINOV2_ARCHS"]

DINOV2_ARCHS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
"""Dinov2Config sizes used when ``random_init`` is set (patch 14)."""


@dataclass
class DerConfig(ExpertConfig):
    """DINOv2 reference-similarity expert."""

    model_path: str | None = "facebook/dinov2-base"
    """Dinov2Model weights: local dir or hub id."""
    pooling: Literal["cls", "patch_mean"] = "cls"
    """Image feature: the CLS token (default) or the mean of the patch tokens."""
    arch: Literal["tiny", "small", "base", "large"] = "base"
    """Architecture built when random_init is true (ignored when loading weights)."""
    image_size: int = 224
    """Center-crop size fed to the model."""
    resize: int = 256
    """Shorter side before the center crop."""

    @classmethod
    def tiny(cls) -> "DerConfig":
        """Random-init 2-layer, 32-wide DINOv2 on 56 px crops."""
        return cls(model_path=None, random_init=True, arch="tiny", image_size=56, resize=64, batch_size=8)


class DerExpert(RewardExpert):
    """Mean DINOv2 cosine of each generated image to its concept's reference images."""

    name = "der"
    requires = ("images", "concepts")
    uses_references = True

    def __init__(self, config: DerConfig):
        super().__init__(config)
        from transformers import Dinov2Config, Dinov2Model

        path = resolve_weights(config.model_path, "model_path", self.name, config.random_init)
        if config.random_init:
            with seeded(config.seed):
                model = Dinov2Model(Dinov2Config(image_size=config.image_size, patch_size=14,
                                                 **DINOV2_ARCHS[config.arch]))
        else:
            with loading(self.name, "model_path", path):
                model = Dinov2Model.from_pretrained(path)
        self.model = self.to_model(model)
        self.spec = ImageSpec(config.image_size, config.resize, IMAGENET_MEAN, IMAGENET_STD)

    def features(self, images) -> torch.Tensor:
        """float32 features ``[N, D]`` of uint8 HWC images (micro-batched)."""
        out = []
        for s in self.chunks(len(images)):
            pixels = preprocess_images(images[s], self.spec, self.device, self.dtype)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            feat = hidden[:, 0] if self.config.pooling == "cls" else hidden[:, 1:].mean(dim=1)
            out.append(feat.float())
        return torch.cat(out)

    def _reference_features(self, concept: str, images: list[np.ndarray]) -> torch.Tensor:
        return self.features(images)

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        feats = self.features(batch.images)
        return np.array([cosine(feats[i:i + 1], self._references[c]).mean().item()
                         for i, c in enumerate(batch.concepts)], dtype=np.float32)
