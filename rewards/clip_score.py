"""CLIP scores (open_clip): CLIP-I, CLIP-T, and the DSOG screen ``0.65·CLIP-I + 0.35·CLIP-T``.

* ``clip_image_scores``: CLIP-I = mean cosine of the generated image to the concept's reference images
  (UniCTokens' eval/clip_eval.py; features L2-normalised, not ×100);
* ``clip_text_scores``: CLIP-T = cosine of the image to the text (the prompt with ``<c>`` → class word, D8);
* ``score(batch)``: ``image_weight·CLIP-I + text_weight·CLIP-T`` (the released code's screen, D6 option).

Evaluation uses the two methods directly. Preprocessing follows open_clip's (shorter side → image size,
bicubic, center crop, the model's mean/std) through the shared batched helper.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    ExpertConfig,
    ImageSpec,
    RewardExpert,
    ScoreBatch,
    check_images,
    check_scores,
    cosine,
    loading,
    preprocess_images,
    resolve_weights,
    seeded,
)

__all__ = ["ClipConfig", "ClipExpert", "TINY_CLIP"]

TINY_CLIP = "tiny"
"""``model_name`` of a built-in 2-layer CLIP (32 px, width 64/32) for tests; uses ViT-B-32's tokenizer."""


@dataclass
class ClipConfig(ExpertConfig):
    """open_clip CLIP-I / CLIP-T expert (and the DSOG screen)."""

    model_name: str = "ViT-B-32"
    """open_clip architecture name (UniCTokens eval and the released screen use ViT-B/32), or "tiny"."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag or a local checkpoint path; ignored when random_init is true."""
    image_weight: float = 0.65
    """Weight of CLIP-I in ``score`` (released DSOG screen: 0.65)."""
    text_weight: float = 0.35
    """Weight of CLIP-T in ``score`` (released DSOG screen: 0.35)."""

    @classmethod
    def tiny(cls) -> "ClipConfig":
        """Random-init tiny CLIP (2 layers, 32 px) with open_clip's bundled BPE tokenizer."""
        return cls(model_name=TINY_CLIP, pretrained=None, random_init=True, batch_size=8)


def _tiny_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return open_clip.CLIP(embed_dim=32,
                          vision_cfg=CLIPVisionCfg(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


class ClipExpert(RewardExpert):
    """CLIP-I against cached reference features, CLIP-T against the prompt."""

    name = "clip"
    uses_references = True

    def __init__(self, config: ClipConfig):
        super().__init__(config)
        import open_clip

        if config.image_weight < 0 or config.text_weight < 0 or config.image_weight + config.text_weight <= 0:
            raise ValueError(f"clip: image_weight/text_weight must be >= 0 with a positive sum, got "
                             f"{config.image_weight}/{config.text_weight}")
        self.requires = ("images",) + (("concepts",) if config.image_weight > 0 else ()) \
            + (("texts",) if config.text_weight > 0 else ())
        tiny = config.model_name == TINY_CLIP
        if config.random_init:
            with seeded(config.seed):
                model = _tiny_clip() if tiny else open_clip.create_model(config.model_name, pretrained=None)
        else:
            if tiny:
                raise ValueError("clip: model_name 'tiny' has no weights; set random_init: true")
            path = resolve_weights(config.pretrained, "pretrained", self.name, False)
            with loading(self.name, "pretrained", path):
                model = open_clip.create_model(config.model_name, pretrained=path, require_pretrained=True)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32" if tiny else config.model_name)
        self.model = self.to_model(model)
        pre = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.spec = ImageSpec(int(size), int(size), tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD)))

    def image_features(self, images) -> torch.Tensor:
        """L2-normalised float32 image features ``[N, D]`` (micro-batched)."""
        return torch.cat([self.model.encode_image(preprocess_images(images[s], self.spec, self.device, self.dtype),
                                                  normalize=True).float() for s in self.chunks(len(images))])

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text features ``[N, D]`` (micro-batched)."""
        return torch.cat([self.model.encode_text(self.tokenizer(texts[s]).to(self.device), normalize=True).float()
                          for s in self.chunks(len(texts))])

    def _reference_features(self, concept: str, images: list[np.ndarray]) -> torch.Tensor:
        return self.image_features(images)

    def _image_scores(self, feats: torch.Tensor, concepts: list[str]) -> np.ndarray:
        missing = sorted({c for c in concepts if c not in self._references})
        if missing:
            raise ValueError(f"clip: no reference features for concept(s) {missing}; call add_reference first")
        return np.array([cosine(feats[i:i + 1], self._references[c]).mean().item()
                         for i, c in enumerate(concepts)], dtype=np.float32)

    def _text_scores(self, feats: torch.Tensor, texts: list[str]) -> np.ndarray:
        return (feats * self.text_features(texts)).sum(dim=-1).cpu().numpy()

    def clip_image_scores(self, images: np.ndarray, concepts: list[str]) -> np.ndarray:
        """CLIP-I per image: mean cosine to the concept's reference images, float32 ``[B]``."""
        if len(concepts) != len(check_images(images, "clip: images")):
            raise ValueError(f"clip: {len(concepts)} concepts for {len(images)} images")
        with torch.inference_mode():
            return check_scores(self._image_scores(self.image_features(images), concepts), len(images), self.name)

    def clip_text_scores(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """CLIP-T per (image, text) pair: cosine similarity, float32 ``[B]``."""
        if len(texts) != len(check_images(images, "clip: images")):
            raise ValueError(f"clip: {len(texts)} texts for {len(images)} images")
        with torch.inference_mode():
            return check_scores(self._text_scores(self.image_features(images), texts), len(images), self.name)

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        cfg = self.config
        feats = self.image_features(batch.images)
        out = np.zeros(len(batch), dtype=np.float32)
        if cfg.image_weight > 0:
            out += cfg.image_weight * self._image_scores(feats, batch.concepts)
        if cfg.text_weight > 0:
            out += cfg.text_weight * self._text_scores(feats, batch.texts)
        return out
