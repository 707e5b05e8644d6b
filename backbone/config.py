"""Configuration of the backbone (checkpoints, dtype, concept-token counts) and of MaskGIT sampling; no torch here,
so loading a config never imports it."""
from __future__ import annotations

from dataclasses import dataclass

BUILTIN_TINY = "builtin:tiny"
"""Tokenizer path that selects the built-in tiny tokenizer (tests and the tiny default)."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Accepted ``model.dtype`` values (``backbone.build.DTYPES`` maps them to torch dtypes)."""


PRESETS = ("real", "tiny")


@dataclass
class ModelConfig:
    """Where the Show-o weights, tokenizer, MAGVIT-v2 and concept tokens come from, and their shapes."""

    preset: str = "real"
    """"real" (Show-o 512: phi-1.5 shapes, MAGVIT 13 bits, 32x32 tokens) | "tiny" (random-init tiny shapes)."""
    random_init: bool = False
    """Must be true to run without weights (tests, the tiny CPU default, benchmarks); never implicit."""
    showo_path: str | None = None
    """Show-o weights: a dir holding pytorch_model.safetensors / model.safetensors, the file, or a hub id
    (showlab/show-o-512x512; hub ids need network or the HF cache). Keys ``showo.model.*``, ``showo.lm_head.*``."""
    tokenizer_path: str | None = None
    """Local phi-1.5 tokenizer dir (or a cached hub id, microsoft/phi-1_5); "builtin:tiny" = BPE trained on a fixed
    built-in corpus (the tiny preset's default when unset)."""
    magvit_path: str | None = None
    """MAGVIT-v2 weights: dir / file / hub id (showlab/magvitv2)."""
    num_understanding_tokens: int = 16
    """UniCTokens stage-1 tokens per concept (<token_0..15>)."""
    num_generation_tokens: int = 8
    """UniCTokens stage-2 tokens per concept (<token_16..23>)."""
    num_stage3_tokens: int = 0
    """UniCTokens stage-3 tokens per concept (8 when starting from a stage-3 checkpoint; 33 rows in all)."""
    concept_checkpoint_dir: str | None = None
    """Dir with epoch_N_{embed,lm_head_weight,lm_head_bias}.pt. "{concept}" is replaced by the concept name; else
    <dir>/<concept>/ is used when it exists, else <dir> itself (single concept only). None = documented init of the
    new rows (class-word mean for <c>), with a warning."""
    concept_checkpoint_epoch: int | None = None
    """N of the epoch_N_* files (required with concept_checkpoint_dir)."""
    dtype: str = "float32"
    """Compute dtype of the Phi: "float32" | "bfloat16" | "float16" (MAGVIT stays float32)."""
    seed: int = 0
    """Seed of every random init (Phi, MAGVIT, concept rows) when random_init is true."""

    @classmethod
    def tiny(cls) -> ModelConfig:
        """Random-init tiny shapes with the built-in tokenizer (CPU tests and the tiny default)."""
        return cls(preset="tiny", random_init=True, tokenizer_path=BUILTIN_TINY)

    @property
    def num_concept_tokens(self) -> int:
        """Learnable tokens per concept (the checkpoint has one more row, for <c>)."""
        return self.num_understanding_tokens + self.num_generation_tokens + self.num_stage3_tokens

    def validate(self) -> None:
        """Reject impossible values (paths are checked when building)."""
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"model.dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if min(self.num_understanding_tokens, self.num_generation_tokens, self.num_stage3_tokens) < 0:
            raise ValueError("model.num_*_tokens must be >= 0")
        if (self.concept_checkpoint_dir is None) != (self.concept_checkpoint_epoch is None):
            raise ValueError("model.concept_checkpoint_dir and model.concept_checkpoint_epoch go together")


@dataclass
class SamplerConfig:
    """MaskGIT sampling settings (Show-o 512 defaults)."""

    timesteps: int = 50
    """MaskGIT steps T (Show-o: 50)."""
    guidance_scale: float = 5.0
    """CFG scale s in ``(1+s)·cond − s·uncond`` (Show-o: 5); 0 disables CFG (cond branch only)."""
    gumbel_temperature: float = 1.0
    """Initial Gumbel temperature τ0 of the confidence noise; compounds as τ ← τ·(1 − (k+1)/T)."""
    schedule: str = "cosine"
    """Mask schedule; only "cosine" (Show-o's default) is implemented."""
    reuse_prefix_kv: bool = True
    """Compute the text prefix K/V once per sample and run only the image block per step."""

    @classmethod
    def tiny(cls) -> SamplerConfig:
        """Few steps for CPU tests."""
        return cls(timesteps=12)
