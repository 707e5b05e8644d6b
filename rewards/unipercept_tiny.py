"""A tiny random-init UniPercept checkpoint, built offline in seconds from the classes the package ships.

Same architecture family as the real checkpoint (``InternVLChatModel``: InternViT vision tower, pixel-shuffle
MLP projector, Qwen2 language model, the ``internvl2_5`` chat template), shrunk: 448 px input with a 56 px patch
(64 patches -> 16 image tokens), 2-layer 32-wide vision tower, 2-layer 32-wide Qwen2. The tokenizer is a small
byte-level BPE ``Qwen2Tokenizer`` (loaded with ``use_fast=False`` as the package does) whose vocabulary holds the
256 byte symbols, the 101 two-letter score tokens ``aa``..``ey`` and the chat / image special tokens.

Needs the UniPercept environment (``transformers==4.49.0`` and ``unipercept-reward``); see
``python -m launch.build_reward_env unipercept``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["ARCHS", "SCORE_TOKENS", "SPECIAL_TOKENS", "build_tiny_checkpoint"]


def _score_token(n: int) -> str:
    """The package's score -> two-letter token map (``aes_tokens.score2aestoken``)."""
    first, offset = ("a", n) if n <= 25 else ("c", n - 26) if n <= 50 else ("d", n - 51) if n <= 75 else ("e", n - 76)
    return first + chr(ord("a") + offset)


SCORE_TOKENS: list[str] = [_score_token(n) for n in range(101)]
"""The 101 score tokens, index = score (0 -> "aa", 100 -> "ey")."""

SPECIAL_TOKENS: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                             "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
"""Special tokens of the InternVL chat tokenizer the scorer needs (chat turns, image placeholders)."""

TINY_VISION = dict(image_size=448, patch_size=56, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                   num_hidden_layers=2, qk_normalization=False, norm_type="layer_norm", qkv_bias=True,
                   use_flash_attn=False, architectures=["InternVisionModel"])
"""InternVisionConfig of the tiny checkpoint."""

TINY_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, rope_theta=1e6, rms_norm_eps=1e-6,
                architectures=["Qwen2ForCausalLM"])
"""Qwen2Config of the tiny checkpoint (``vocab_size`` is set from the tokenizer)."""


def _write_tokenizer(dest: Path) -> None:
    from transformers import Qwen2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    for tok in SCORE_TOKENS:
        vocab[tok] = len(vocab)
        merges.append(f"{tok[0]} {tok[1]}")
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = Qwen2Tokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"), unk_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.save_pretrained(str(dest))


ARCHS: dict[str, dict] = {
    "tiny": {},
    "small": dict(vision=dict(patch_size=14, hidden_size=128, num_attention_heads=4, intermediate_size=256),
                  llm=dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)),
}
"""Random-init sizes: "tiny" (16 image tokens, 32 wide; tests) and "small" (patch 14: the real checkpoint's 256
image tokens per 448 px image, 128 / 256 wide; benchmarks)."""


def build_tiny_checkpoint(dest: str | os.PathLike, seed: int = 0, arch: str = "tiny") -> Path:
    """Write a random-init UniPercept checkpoint (model + tokenizer) of size ``arch`` to ``dest``; returns its path.

    Deterministic for a given ``seed``. The directory is written next to ``dest`` and renamed into place, so
    concurrent builders never see a half-written checkpoint; an existing complete ``dest`` is kept.
    """
    if arch not in ARCHS:
        raise ValueError(f"unipercept: unknown tiny arch {arch!r}; known: {sorted(ARCHS)}")
    import torch
    from transformers import AutoTokenizer
    from unipercept_reward.internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel

    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "tokenizer_config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _write_tokenizer(work)
        vocab_size = len(AutoTokenizer.from_pretrained(str(work), trust_remote_code=True, use_fast=False))
        vision = dict(TINY_VISION, **ARCHS[arch].get("vision", {}))
        llm = dict(TINY_LLM, vocab_size=vocab_size, **ARCHS[arch].get("llm", {}))
        config = InternVLChatConfig(vision_config=vision, llm_config=llm,
                                    downsample_ratio=0.5, template="internvl2_5", ps_version="v2", select_layer=-1,
                                    force_image_size=448, dynamic_image_size=False, use_thumbnail=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = InternVLChatModel(config, use_flash_attn=False)
            for p in model.parameters():   # visible logit spread: the package's init leaves near-uniform scores
                torch.nn.init.normal_(p, std=0.2 * (32 / p.shape[-1]) ** 0.5) if p.dim() > 1 else None
        model.config.architectures = ["InternVLChatModel"]
        model.save_pretrained(str(work), safe_serialization=True)
        try:
            os.replace(work, dest)
        except OSError:  # another process finished first
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
