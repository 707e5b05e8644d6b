"""Build the policy (Show-o Phi + tokenizer + concept tokens + MAGVIT-v2) from a :class:`ModelConfig`.

Order (real preset): tokenizer (phi-1.5 + Show-o specials) -> ShowoPhi with the pre-concept vocab (58498) -> Show-o
safetensors -> concept-token surgery (image/mask rows move up) -> concept checkpoint rows. The tiny preset runs the
same path with random init. Same config + seed -> bit-identical weights in every process: random init happens on CPU
in fp32 under a forked RNG seeded with ``seed``, then moves to the device/dtype. Concepts are added sorted by name, so
ids do not depend on the order the caller lists them in.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from backbone.checkpoint import load_showo_state_dict
from backbone.concepts import add_concept_tokens, load_concept_checkpoint
from backbone.config import ModelConfig
from backbone.phi import ShowoPhi, ShowoPhiConfig
from backbone.tokenizer import BUILTIN_TINY, ConceptTokens, ShowoTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ConceptSpec:
    """A concept to add: its name (``<name>``) and class word (init of ``<name>``; reward prompts, D8)."""

    name: str
    """Concept name without brackets, e.g. "bo"."""
    class_word: str | None = None
    """Class word ("dog", "man"); None = no class-word init."""


@dataclass
class Policy:
    """What :func:`build_policy` returns."""

    model: ShowoPhi
    """The Phi LM (with concept rows)."""
    tok: ShowoTokenizer
    """Tokenizer with Show-o specials and the concept tokens."""
    concepts: dict[str, ConceptTokens]
    """Concept tokens by name."""
    vq: object
    """MAGVITv2 (eval, frozen, float32)."""
    phi_config: ShowoPhiConfig
    """The model's config (vocab_size includes the concept rows)."""
    concept_source: dict[str, str] = field(default_factory=dict)
    """Per concept: "checkpoint:<dir>@<epoch>" or "init"."""


def _looks_like_hub_id(path: str) -> bool:
    return (not os.path.isabs(path) and path.count("/") == 1 and not path.startswith((".", "~"))
            and not os.path.exists(path))


def _resolve_weights_path(path: str, what: str) -> str:
    """A local path as is; a hub id via huggingface_hub (cache or network) -> local snapshot dir."""
    if os.path.exists(os.path.expanduser(path)) or not _looks_like_hub_id(path):
        return os.path.expanduser(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # noqa: BLE001 - re-raised with what and where
        raise FileNotFoundError(f"model.{what}: {path!r} is neither a local path nor a reachable/cached hub id "
                                f"({type(e).__name__}: {e})") from e


def _check_sources(cfg: ModelConfig) -> None:
    """Raise one error listing everything missing (unset fields without random_init, absent local paths)."""
    unset = []
    if cfg.tokenizer_path is None and cfg.preset == "real":
        unset.append("tokenizer_path (local phi-1.5 tokenizer dir)")
    if not cfg.random_init:
        if cfg.showo_path is None:
            unset.append("showo_path (Show-o safetensors)")
        if cfg.magvit_path is None:
            unset.append("magvit_path (MAGVIT-v2 safetensors)")
    if unset:
        raise ValueError("model config: missing " + "; ".join(unset) +
                         ("" if cfg.random_init else ". Set them, or set model.random_init=true for random weights"))
    absent = [f"{name}={p!r}" for name, p in (("tokenizer_path", cfg.tokenizer_path), ("showo_path", cfg.showo_path),
                                             ("magvit_path", cfg.magvit_path),
                                             ("concept_checkpoint_dir", cfg.concept_checkpoint_dir))
              if p is not None and p != BUILTIN_TINY and "{concept}" not in p
              and not os.path.exists(os.path.expanduser(p)) and not _looks_like_hub_id(p)]
    if absent:
        raise FileNotFoundError("model config: these paths do not exist: " + ", ".join(absent))


def _concept_dir(cfg: ModelConfig, name: str, n_concepts: int) -> str:
    d = os.path.expanduser(cfg.concept_checkpoint_dir)
    if "{concept}" in d:
        return d.replace("{concept}", name)
    if os.path.isdir(os.path.join(d, name)):
        return os.path.join(d, name)
    if n_concepts > 1:
        raise FileNotFoundError(f"model.concept_checkpoint_dir {d!r} has no sub-dir {name!r}; with several concepts "
                                f"use <dir>/<concept>/ or a '{{concept}}' placeholder")
    return d


def build_tokenizer(cfg: ModelConfig, codebook_size: int) -> ShowoTokenizer:
    """The tokenizer of ``cfg`` (Show-o specials added, no concepts yet)."""
    path = cfg.tokenizer_path or (BUILTIN_TINY if cfg.preset == "tiny" else None)
    if path is None:
        raise ValueError("model.tokenizer_path is required for preset 'real' (local phi-1.5 tokenizer dir)")
    return ShowoTokenizer.from_pretrained(path, codebook_size=codebook_size)


def build_vq(cfg: ModelConfig, device: str | torch.device):
    """MAGVIT-v2 of the preset: loaded from ``cfg.magvit_path``, or seeded random init when ``cfg.random_init``."""
    from backbone.magvit import MagvitConfig, load_magvit, random_magvit

    vq_cfg = MagvitConfig.tiny() if cfg.preset == "tiny" else MagvitConfig.real()
    if cfg.magvit_path is not None:
        vq = load_magvit(_resolve_weights_path(cfg.magvit_path, "magvit_path"), vq_cfg)
    else:
        vq = random_magvit(vq_cfg, seed=cfg.seed + 1)
    return vq.to(device).eval().requires_grad_(False)


def build_policy(cfg: ModelConfig, concepts: list[ConceptSpec] | tuple = (), device: str | torch.device = "cpu"
                 ) -> Policy:
    """Tokenizer + ShowoPhi (+ Show-o weights) + concept tokens (+ checkpoint rows) + MAGVIT-v2 on ``device``.

    ``concepts``: ConceptSpec (or (name, class_word) tuples / plain names). Raises ValueError / FileNotFoundError
    listing what is missing; never falls back to random weights unless ``cfg.random_init``."""
    cfg.validate()
    _check_sources(cfg)
    specs = sorted((as_concept_spec(c) for c in concepts), key=lambda s: s.name)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate concept names: {names}")
    dtype = DTYPES[cfg.dtype]

    vq = build_vq(cfg, device)
    tok = build_tokenizer(cfg, codebook_size=vq.codebook_size)
    phi_cfg = (ShowoPhiConfig.tiny(vocab_size=tok.vocab_size) if cfg.preset == "tiny"
               else ShowoPhiConfig.real(vocab_size=tok.vocab_size))

    if cfg.showo_path is not None:
        with torch.device("meta"):
            model = ShowoPhi(phi_cfg)
        model = model.to_empty(device=device).to(dtype)
        load_showo_state_dict(model, _resolve_weights_path(cfg.showo_path, "showo_path"))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = ShowoPhi(phi_cfg)

    added: dict[str, ConceptTokens] = {}
    source: dict[str, str] = {}
    for i, spec in enumerate(specs):
        ct = add_concept_tokens(model, tok, spec.name, cfg.num_concept_tokens, class_word=spec.class_word,
                                seed=cfg.seed * 1000 + i)
        added[spec.name] = ct
        source[spec.name] = "init"
    if cfg.concept_checkpoint_dir is not None:
        for spec in specs:
            d = _concept_dir(cfg, spec.name, len(specs))
            load_concept_checkpoint(model, added[spec.name], d, cfg.concept_checkpoint_epoch)
            source[spec.name] = f"checkpoint:{d}@{cfg.concept_checkpoint_epoch}"
    elif specs and not cfg.random_init:
        log.warning("model.concept_checkpoint_dir is not set: concept rows of %s use the default init "
                    "(class-word mean for <c>, text-row statistics for the tokens)", names)

    model = model.to(device=device, dtype=dtype)
    return Policy(model=model, tok=tok, concepts=added, vq=vq, phi_config=model.config, concept_source=source)


def as_concept_spec(c) -> ConceptSpec:
    """A ConceptSpec from a ConceptSpec, a name, or a (name, class word) pair."""
    if isinstance(c, ConceptSpec):
        return c
    if isinstance(c, str):
        return ConceptSpec(name=c)
    if isinstance(c, (tuple, list)) and len(c) == 2:
        return ConceptSpec(name=str(c[0]), class_word=c[1])
    name, cw = getattr(c, "name", None), getattr(c, "class_word", None)
    if name is None:
        raise ValueError(f"cannot read a concept spec from {c!r}")
    return ConceptSpec(name=str(name), class_word=cw)
