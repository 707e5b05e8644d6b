"""UniPercept, the perceptual expert: image aesthetics (IAA), quality (IQA), structure/texture richness (ISTA).

UniPercept (Cao et al. 2025; PyPI ``unipercept-reward``) is an InternVL chat model asked "Rate the <desc> score
of the image in 0-100" with the answer coded as two letters (``aa`` = 0 .. ``ey`` = 100). The score of one
dimension is the expectation of the softmax over the 101 score tokens at the answer position. This expert
computes exactly that, but batched: per micro-batch the vision tower and projector run once per image, the prompt
prefix the three questions share (system turn, image tokens, "Rate the") runs once per image, and the three
dimension-specific suffixes (IAA, IQA, ISTA) run as one padded batch on that prefix's K/V cache, with SDPA attention
where the package falls back to eager; only the 101 score logits of the last position are computed, and the softmax
and expectation are in float32. Images arrive as uint8 arrays (no files) and are
resized like the package (PIL bicubic to 448x448, ImageNet mean/std).

``score`` returns the weighted mean of the configured dimensions times ``scale`` (0.01: the range [0, 1] of the
cosine experts); :meth:`UniPerceptExpert.dimension_scores` returns each dimension in the package's 0-100 units.

The package pins ``transformers==4.49.0``; this module runs only in the UniPercept environment built by
``python -m launch.build_reward_env unipercept`` (Serve runs its replicas there through
``serve.unipercept.python``). Importing it elsewhere works; building the expert raises an error naming the
expert and the command.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rewards.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExpertConfig,
    RewardExpert,
    ScoreBatch,
    check_images,
    resolve_weights,
)

__all__ = ["DIMENSIONS", "UniPerceptConfig", "UniPerceptExpert", "REQUIRED_TRANSFORMERS", "question"]

DIMENSIONS: dict[str, str] = {"iaa": "aesthetics", "iqa": "quality", "ista": "structure and texture richness"}
"""Dimension key -> the words the package puts in its prompt (``UniPerceptRewardInferencer.reward``)."""

REQUIRED_TRANSFORMERS = "4.49.0"
"""The transformers version the package's model code is pinned to."""

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

BUILD_HINT = "build it with `python -m launch.build_reward_env unipercept` and run this expert with its python " \
             "(serve.unipercept.python)"


def question(desc: str) -> str:
    """The package's scoring question for one dimension (verbatim from ``InternVLChatModel.score``)."""
    return (f"<image>Rate the {desc} score of the image in 0-100. In the output format, numbers are replaced by 2 "
            "corresponding letters, and the mapping relationship is: score 0 to 25: 0-aa, 1-ab, 2-ac, 3-ad, ... , "
            "25-az, \nscore 26 to 50: 26-ca, 27-cb, 28-cc, 29-cd, ..., 50-cy, \nscore 51 to 75: 51-da, 52-db, "
            "53-dc, 54-dd, ..., 75-dy, \nscore 76 to 100: 76-ea, 77-eb, 73-ec, 74-ed, ..., 100-ey. \nThe answer "
            "only outputs 2 corresponding letters.")


def _default_weights() -> dict[str, float]:
    return {"iaa": 1.0, "iqa": 1.0, "ista": 1.0}


@dataclass
class UniPerceptConfig(ExpertConfig):
    """UniPercept checkpoint, the dimensions scored and how they are combined into one reward."""

    model_path: str | None = None
    """Local UniPercept checkpoint directory (InternVL chat model + tokenizer, e.g. a copy of the hub repo
    Thunderbolt215215/UniPercept). Never downloaded; required unless random_init."""
    dimensions: list[str] = field(default_factory=lambda: ["iaa", "iqa", "ista"])
    """Dimensions to score (any of iaa, iqa, ista); each costs one language-model pass per image."""
    weights: dict[str, float] = field(default_factory=_default_weights)
    """Dimension -> weight of the reward (a weighted mean; missing dimensions weigh 0)."""
    scale: float = 0.01
    """Multiplies the 0-100 weighted mean before it leaves ``score`` (0.01: [0, 1] like the cosine experts)."""
    tiny_dir: str | None = None
    """Where random_init writes its tiny checkpoint (None: a fresh temporary directory, removed after loading)."""
    batch_size: int = 8
    """Images per micro-batch (the language model sees ``batch_size * len(dimensions)`` sequences)."""

    @classmethod
    def tiny(cls) -> "UniPerceptConfig":
        """The tiny random-init checkpoint (448 px, 56 px patches, 2-layer Qwen2), built offline in seconds."""
        return cls(model_path=None, random_init=True, batch_size=4)

    def validate(self) -> None:
        """Known dimensions, finite non-negative weights with a positive total over the dimensions, scale > 0."""
        unknown = sorted(set(self.dimensions) - set(DIMENSIONS))
        if not self.dimensions or unknown or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"unipercept: config field 'dimensions' = {self.dimensions} must be distinct names "
                             f"from {list(DIMENSIONS)}")
        extra = sorted(set(self.weights) - set(self.dimensions))
        if extra:
            raise ValueError(f"unipercept: config field 'weights' names dimension(s) {extra} not in dimensions "
                             f"{self.dimensions}")
        for name, w in self.weights.items():
            if not np.isfinite(w) or w < 0:
                raise ValueError(f"unipercept: config field 'weights.{name}' = {w} must be finite and >= 0")
        if sum(self.weights.get(d, 0.0) for d in self.dimensions) <= 0:
            raise ValueError(f"unipercept: config field 'weights' = {self.weights} gives no dimension a weight")
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"unipercept: config field 'scale' = {self.scale} must be > 0")


def _import_package():
    """The package's model class and conversation templates, or an error naming the expert and the fix."""
    import transformers

    if transformers.__version__ != REQUIRED_TRANSFORMERS:
        raise RuntimeError(f"unipercept: needs transformers=={REQUIRED_TRANSFORMERS} (the UniPercept environment) "
                           f"but {sys.executable} has transformers {transformers.__version__}; {BUILD_HINT}")
    try:
        from unipercept_reward.internvl.conversation import get_conv_template
        from unipercept_reward.internvl.model.internvl_chat import InternVLChatModel
    except Exception as exc:  # noqa: BLE001 - any import failure means a broken environment
        raise RuntimeError(f"unipercept: the package unipercept-reward does not import in {sys.executable} "
                           f"({type(exc).__name__}: {exc}); {BUILD_HINT}") from exc
    return InternVLChatModel, get_conv_template


def _check_checkpoint(path: str) -> None:
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (Path(path) / f).is_file()]
    if missing:
        raise FileNotFoundError(f"unipercept: config field 'model_path' = {path!r} is not a UniPercept checkpoint "
                                f"directory (missing {missing}); download Thunderbolt215215/UniPercept yourself "
                                f"and point model_path at it")


class UniPerceptExpert(RewardExpert):
    """Weighted mean of UniPercept's IAA / IQA / ISTA scores of each generated image (no references)."""

    name = "unipercept"
    requires = ("images",)
    uses_references = False

    def __init__(self, config: UniPerceptConfig):
        super().__init__(config)
        config.validate()
        model_cls, get_conv_template = _import_package()
        path = resolve_weights(config.model_path, "model_path", self.name, config.random_init, local_only=True)
        tmp = None
        if config.random_init:
            from rewards.unipercept_tiny import build_tiny_checkpoint

            if config.tiny_dir:
                path = str(build_tiny_checkpoint(config.tiny_dir, config.seed))
            else:
                tmp = tempfile.mkdtemp(prefix="unipercept-tiny-")
                path = str(build_tiny_checkpoint(Path(tmp) / "ckpt", config.seed))
        _check_checkpoint(path)
        try:
            self.model, self.tokenizer = self._load(model_cls, path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise FileNotFoundError(f"unipercept: could not load config field 'model_path' = {path!r}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        finally:
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        mcfg = self.model.config
        self.image_size = int(mcfg.force_image_size or mcfg.vision_config.image_size)
        self.dimensions = list(config.dimensions)
        total = sum(config.weights.get(d, 0.0) for d in self.dimensions)
        self.dim_weights = np.array([config.weights.get(d, 0.0) / total for d in self.dimensions], np.float64)
        self._prepare_prompts(get_conv_template)

    def _load(self, model_cls, path: str):
        from transformers import AutoTokenizer

        try:
            import flash_attn  # noqa: F401
            flash = self.device.type == "cuda"
        except ImportError:
            flash = False
        model = model_cls.from_pretrained(path, torch_dtype=self.dtype, low_cpu_mem_usage=True, use_flash_attn=flash)
        if not flash:   # the package falls back to eager attention; SDPA is the same math without the big matrices
            model.language_model.config._attn_implementation = "sdpa"
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
        return self.to_model(model), tokenizer

    def _prepare_prompts(self, get_conv_template) -> None:
        """Token ids of each dimension's prompt (identical for every image: the image is a fixed number of
        ``<IMG_CONTEXT>`` tokens), split into the prefix they share and padded suffixes, and the score-token ids."""
        from rewards.unipercept_tiny import SCORE_TOKENS

        tok, model = self.tokenizer, self.model
        self.img_context_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
        self.score_ids = torch.tensor(tok.convert_tokens_to_ids(SCORE_TOKENS), device=self.device)
        unk = tok.unk_token_id
        if (unk is not None and bool((self.score_ids == unk).any())) or self.img_context_id in (None, unk):
            raise ValueError("unipercept: the checkpoint's tokenizer lacks the score tokens aa..ey or <IMG_CONTEXT>")
        image_tokens = IMG_START + IMG_CONTEXT * model.num_image_token + IMG_END
        self.prompts: list[torch.Tensor] = []
        for dim in self.dimensions:
            template = get_conv_template(model.template)
            template.system_message = model.system_message
            template.append_message(template.roles[0], question(DIMENSIONS[dim]))
            template.append_message(template.roles[1], None)
            ids = tok(template.get_prompt().replace("<image>", image_tokens, 1), return_tensors="pt")["input_ids"][0]
            if int((ids == self.img_context_id).sum()) != model.num_image_token:
                raise ValueError(f"unipercept: the prompt of {dim!r} does not hold {model.num_image_token} image "
                                 f"tokens after tokenization")
            self.prompts.append(ids)
        # The prompts share a prefix (system turn, the image, "Rate the"): it runs once per image and its K/V
        # cache is reused by the dimension-specific suffixes. At least one token stays in every suffix.
        prefix = 0
        while prefix < min(len(p) for p in self.prompts) - 1 and len({int(p[prefix]) for p in self.prompts}) == 1:
            prefix += 1
        if int((self.prompts[0][prefix:] == self.img_context_id).sum()):
            prefix = 0                   # the image tokens are not all shared: no prefix reuse
        self._prefix = self.prompts[0][:prefix].to(self.device)
        suffixes = [p[prefix:] for p in self.prompts]
        lengths = [len(p) for p in suffixes]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(suffixes), max(lengths)), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(suffixes), prefix + max(lengths)), dtype=torch.long)
        mask[:, :prefix] = 1
        for i, p in enumerate(suffixes):
            ids[i, :len(p)] = p
            mask[i, prefix:prefix + len(p)] = 1
        self._ids, self._mask = ids.to(self.device), mask.to(self.device)
        self._last = torch.tensor(lengths, device=self.device) - 1
        self._weights101 = torch.arange(101, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------------------------------------- images
    def pixels(self, images) -> torch.Tensor:
        """uint8 HWC images -> ``[N,3,S,S]`` like the package: PIL bicubic resize to S x S, ImageNet mean/std."""
        from PIL import Image

        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        out = []
        for img in images:
            pil = Image.fromarray(np.ascontiguousarray(img), "RGB")
            arr = np.asarray(pil.resize((self.image_size, self.image_size), Image.BICUBIC), dtype=np.uint8)
            out.append((torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0) - mean) / std)
        return torch.stack(out).to(device=self.device, dtype=self.dtype)

    # --------------------------------------------------------------------------------------------- scoring
    def _with_image(self, ids: torch.Tensor, vit: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``ids`` [m, L] with the ``<IMG_CONTEXT>`` positions replaced by ``vit`` [m, T, C]."""
        embeds = self.model.language_model.get_input_embeddings()(ids)
        selected = ids == self.img_context_id
        if bool(selected.any()):
            embeds[selected] = vit.reshape(-1, vit.shape[-1]).to(embeds.dtype)
        return embeds

    def _dimension_chunk(self, images) -> torch.Tensor:
        """float32 ``[n, D]`` 0-100 scores of one micro-batch."""
        lm = self.model.language_model
        vit = self.model.extract_feature(self.pixels(images))                 # once per image: [n, T, C]
        n, d = vit.shape[0], len(self.prompts)
        cache = None
        if len(self._prefix):                                                 # shared prefix: once per image
            prefix = self._prefix.expand(n, -1)
            cache = lm.model(inputs_embeds=self._with_image(prefix, vit), use_cache=True).past_key_values
            cache.batch_repeat_interleave(d)                                  # row i*d + k: image i, dimension k
            vit = vit[:0]
        else:
            vit = vit.repeat_interleave(d, dim=0)
        ids = self._ids.repeat(n, 1)
        hidden = lm.model(inputs_embeds=self._with_image(ids, vit), attention_mask=self._mask.repeat(n, 1),
                          past_key_values=cache, use_cache=cache is not None).last_hidden_state
        last = hidden[torch.arange(n * d, device=self.device), self._last.repeat(n)]
        logits = lm.lm_head(last)[:, self.score_ids].float()
        return (torch.softmax(logits, dim=-1) @ self._weights101).view(n, d)

    def dimension_scores(self, images) -> dict[str, np.ndarray]:
        """``{dimension: float32 [N]}`` in 0-100 (the package's units) for uint8 HWC images."""
        images = check_images(images, f"{self.name}: images")
        with torch.inference_mode():
            out = torch.cat([self._dimension_chunk(images[s]) for s in self.chunks(len(images))]).cpu().numpy()
        bad = np.argwhere(~np.isfinite(out))
        if bad.size:
            raise FloatingPointError(f"{self.name}: non-finite dimension score(s) at (sample, dimension) "
                                     f"{bad.tolist()}")
        return {dim: out[:, k].astype(np.float32) for k, dim in enumerate(self.dimensions)}

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        dims = self.dimension_scores(list(batch.images))
        total = sum(w * dims[d].astype(np.float64) for d, w in zip(self.dimensions, self.dim_weights))
        return (total * self.config.scale).astype(np.float32)
