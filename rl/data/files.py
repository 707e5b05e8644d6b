"""Readers of the single files of the released UniCTokens / UnifyBench++ layout (strict, one error per problem).

Each function reads one file the way the released code (arctanxarc/UniCTokens: ``sync_r1_grpo/``, ``eval/``,
``train_w_3_stages/``) reads it, and raises :class:`DatasetError` naming the file and the field for anything it
cannot use. :mod:`rl.data.reader` assembles them into a :class:`rl.data.reader.ConceptDataset`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["DatasetError", "DataConfig", "QA", "ReasoningPrompt", "TestItem", "load_image", "read_json",
           "image_files", "check_concept_name", "derive_category", "read_t2i_conditions", "read_train_images",
           "match_conversation_keys", "read_test_items", "split_reasoning", "CATEGORIES", "IMAGE_EXTS",
           "T2I_DEFAULT_KEY", "CONCEPT_NAME"]

CATEGORIES = ("human", "animal", "object")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
T2I_DEFAULT_KEY = "personalized_driven_generation"
CONCEPT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
"""Allowed concept names: letters, digits, ``_`` and ``-`` (a name becomes a folder and a file name)."""
TEST_ITEM_TYPES = ("rec", "vqa", "text_only")
"""``type`` values of ``test_data/<c>.json`` (plus any type containing "choice"), as ``eval/eval_p_mmu.py``."""


class DatasetError(ValueError):
    """A missing or malformed dataset file; the message names the file and field."""


@dataclass
class DataConfig:
    """Dataset reader settings (``data.reader``), applied wherever the dataset is read."""

    max_image_pixels: int = 4096 * 4096
    """Images with more pixels are rejected (wrong file / decompression bomb)."""
    min_image_side: int = 8
    """Images with a smaller side are rejected as empty."""
    verify_images: bool = True
    """Decode every image once at load time so a broken or truncated file fails before any work starts
    (images are then loaded lazily)."""
    max_json_bytes: int = 16 * 1024 * 1024
    """Largest JSON file of the dataset accepted, in bytes, checked before the file is read or parsed (far above any
    file of the released layout; a larger one is a wrong file, and parsing it would take memory out of proportion)."""
    max_json_items: int = 200_000
    """Most values one JSON file of the dataset may hold, counting every list element and object member at any depth
    (far above any file of the released layout)."""
    reasoning_train_fraction: float = 0.5
    """Share of ``test/<c>/t2i_conditions.json["personalized_driven_generation"]`` used as training reasoning
    prompts: the first ``int((n + 1) * fraction)`` prompts, each paired by index with ``extra_info``; the rest are
    held out for Rea. / Rea. Gen. (the released ``grpo.py``: ``rate = 0.5``)."""

    @classmethod
    def tiny(cls) -> "DataConfig":
        """Tiny setting (the sample data): same checks, smaller pixel cap."""
        return cls(max_image_pixels=1024 * 1024)

    def validate(self) -> None:
        """Reject impossible values."""
        if not 0.0 < self.reasoning_train_fraction <= 1.0:
            raise ValueError("data.reader.reasoning_train_fraction must be in (0, 1]")
        if self.max_image_pixels < 1 or self.min_image_side < 1:
            raise ValueError("data.reader.max_image_pixels and data.reader.min_image_side must be >= 1")
        if self.max_json_bytes < 1 or self.max_json_items < 1:
            raise ValueError("data.reader.max_json_bytes and data.reader.max_json_items must be >= 1")


@dataclass
class QA:
    """A question–answer pair (conversations, recognitions, VQA, text-only QA)."""

    query: str
    """Question; the concept appears as "<c>"."""
    answer: str
    """Reference answer."""
    image: str | None = None
    """Image key (file name) the pair belongs to, if any."""


@dataclass
class ReasoningPrompt:
    """A reasoning prompt IP and the extra_info item it asks for."""

    prompt: str
    """Generation-style prompt mentioning "<c>", e.g. "A photo of <c> at the beach."."""
    answer_index: int
    """0-based index of the matching item in ConceptInfo.extra_info."""


@dataclass
class TestItem:
    """One item of ``test_data/<c>.json`` (``gen_test_data.py``'s output, read by ``eval/eval_p_mmu.py``)."""

    type: str
    """"rec" | "vqa" | "text_only" | a type containing "choice"."""
    image: Path
    """The resolved image file."""
    question: str
    """The human turn with ``"<image>\\n"`` removed (as eval_p_mmu.py)."""
    answer: str
    """The gpt turn (for rec: "Yes." / "No.")."""


# ------------------------------------------------------------------------------------------ files
def _count_items(value: Any) -> int:
    """Every list element and object member in ``value``, at any depth."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            n += len(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            n += len(v)
            stack.extend(v)
    return n


def read_json(path: Path, required: bool = True, cfg: DataConfig | None = None) -> Any:
    """Parsed JSON of ``path`` (None when absent and not ``required``); DatasetError on a missing file, a file above
    ``cfg.max_json_bytes`` (checked before reading it) or holding more than ``cfg.max_json_items`` values, invalid
    JSON or non-UTF-8 text. ``cfg``: the ``data.reader`` limits (None = their defaults)."""
    cfg = cfg or DataConfig()
    if not path.is_file():
        if not required:
            return None
        raise DatasetError(f"{path}: required file is missing")
    size = path.stat().st_size
    if size > cfg.max_json_bytes:
        raise DatasetError(f"{path}: {size} bytes, above the limit data.reader.max_json_bytes={cfg.max_json_bytes} "
                           "(not read; raise the limit if the file is meant to be this large)")
    try:
        data = json.loads(path.read_bytes()[:cfg.max_json_bytes + 1].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    items = _count_items(data)
    if items > cfg.max_json_items:
        raise DatasetError(f"{path}: {items} values (list elements and object members), above the limit "
                           f"data.reader.max_json_items={cfg.max_json_items}")
    return data


def load_image(path: Path, cfg: DataConfig | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; DatasetError naming the file if broken/truncated/empty/huge."""
    cfg = cfg or DataConfig()
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: empty image file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > cfg.max_image_pixels:
                raise DatasetError(f"{path}: image is {w}x{h} = {w * h} pixels, above data.reader.max_image_pixels"
                                   f"={cfg.max_image_pixels}")
            if min(w, h) < cfg.min_image_side:
                raise DatasetError(f"{path}: image is {w}x{h}, smaller than data.reader.min_image_side="
                                   f"{cfg.min_image_side} (empty image?)")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: image too large ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(arr)


def _natural_key(p: Path) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.name) if t)


def image_files(folder: Path) -> list[Path]:
    """Image files of ``folder`` in natural order, without the released code's ``mask`` files (``pdata.py`` skips
    any name containing "mask"); [] when the folder is absent."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and "mask" not in p.name), key=_natural_key)


def check_concept_name(name: Any, where: str) -> str:
    """``name`` if it is a safe concept name (letters, digits, ``_``, ``-``), else DatasetError naming ``where``."""
    if not isinstance(name, str) or not CONCEPT_NAME.match(name):
        raise DatasetError(f"{where}: concept name {name!r} is not allowed (letters, digits, '_' and '-' only: it "
                           "becomes a folder and file name)")
    return name


# ------------------------------------------------------------------------------------------ info.json
def derive_category(info: dict, path: Path) -> tuple[str, str]:
    """(category, rule that decided it) for an ``info.json`` object.

    1. an explicit ``category`` (human | animal | object) wins;
    2. **human** when ``conversation_type == "human"`` or ``"man" in class.lower()`` — the released rule that picks
       the face reward (``train_w_3_stages``: conversation_type; ``sync_r1_grpo/grpo.py``: ``'man' in class``; note it
       also matches "woman" and "human");
    3. ``conversation_type`` when it is "animal" or "object";
    4. ``generation_type``: "live_subject" → animal, "object" → object (``prompts_to_eval.json``'s two lists);
    5. otherwise a DatasetError asking for an explicit ``category``.
    """
    explicit = info.get("category")
    if explicit is not None:
        if explicit not in CATEGORIES:
            raise DatasetError(f"{path}: field 'category' must be one of {CATEGORIES}, got {explicit!r}")
        return explicit, "category"
    conv = info.get("conversation_type")
    cls = info.get("class")
    if conv == "human" or (isinstance(cls, str) and "man" in cls.lower()):
        return "human", "conversation_type/class"
    if conv in ("animal", "object"):
        return conv, "conversation_type"
    gen = info.get("generation_type")
    if gen == "live_subject":
        return "animal", "generation_type"
    if gen == "object":
        return "object", "generation_type"
    raise DatasetError(f"{path}: cannot derive the concept's category from 'conversation_type'={conv!r}, "
                       f"'class'={cls!r}, 'generation_type'={gen!r}; add \"category\": \"human\"|\"animal\"|\"object\"")


# ------------------------------------------------------------------------------------------ t2i conditions
def read_t2i_conditions(path: Path, required: bool = True, cfg: DataConfig | None = None) -> dict[str, list[str]]:
    """``t2i_conditions.json`` in both released forms: a dict of prompt lists (``grpo.py`` reads
    ``["personalized_driven_generation"]``) or a plain list (``eval/gen_p_images_for_mmu_t2i.py``), which lands
    under that key. {} when absent and not ``required``."""
    raw = read_json(path, required=required, cfg=cfg)
    if raw is None:
        return {}
    raw = {T2I_DEFAULT_KEY: raw} if isinstance(raw, list) else raw
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a list of prompts or an object of prompt lists, got "
                           f"{type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise DatasetError(f"{path}: field {k!r} must be a list of non-empty prompt strings")
        out[k] = [x.strip() for x in v]
    return out


def split_reasoning(prompts: list[str], extra_info: list[str], fraction: float
                    ) -> tuple[list[ReasoningPrompt], list[ReasoningPrompt], list[str]]:
    """(training pairs, held-out pairs, held-out prompts without a fact) from the personalized-driven prompts.

    The released ``grpo.py`` draws ``r = randint(1, int((n + 1) * rate))`` and pairs ``prompts[r - 1]`` with
    ``extra_info[r - 1]``: the first ``int((n + 1) * fraction)`` prompts train, each with the fact of the same
    index. The rest are held out with the same index pairing; prompts past the end of ``extra_info`` have no fact.
    """
    n_train = min(len(prompts), int((len(prompts) + 1) * fraction))
    pairs = [ReasoningPrompt(p, i) for i, p in enumerate(prompts) if i < len(extra_info)]
    return pairs[:n_train], pairs[n_train:], prompts[max(n_train, len(extra_info)):]


# ------------------------------------------------------------------------------------------ train_images.json
def read_train_images(root: Path, cfg: DataConfig | None = None) -> dict[str, list[str]] | None:
    """``concept/train/train_images.json`` ({concept: [file names]}, the reference images of the released CLIP
    and face rewards and of k-means init); None when absent."""
    path = root / "concept" / "train" / "train_images.json"
    raw = read_json(path, required=False, cfg=cfg)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object mapping concept -> list of image file names")
    for k, v in raw.items():
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise DatasetError(f"{path}: field {k!r} must be a list of image file names")
    return raw


# ------------------------------------------------------------------------------------------ conversations
def match_conversation_keys(keys: list[str], image_paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """(image path → key, unused keys): each image gets the FIRST key, in file order, that is a substring of its
    path (``grpo.py``: ``for k in vqa.keys(): if k in GT_IMAGE_PATH``), so "3.png" also matches ".../13.png" when it
    comes first, exactly as released. Paths are given relative to the dataset root."""
    matched: dict[str, str] = {}
    for p in image_paths:
        for k in keys:
            if k in p:
                matched[p] = k
                break
    used = set(matched.values())
    return matched, [k for k in keys if k not in used]


# ------------------------------------------------------------------------------------------ test_data/<c>.json
def _resolve_test_image(raw: str, root: Path, concept: str) -> Path | None:
    p = Path(raw)
    candidates = [p] if p.is_absolute() else [root / p, root / "concept" / "test" / concept / p]
    s = raw.replace("\\", "/")
    for anchor in ("concept/", "random_images/", "black_512x512"):   # a path written on another machine
        if anchor in s:
            candidates.append(root / s[s.index(anchor):])
    candidates.append(root / "concept" / "test" / concept / p.name)
    return next((c for c in candidates if c.is_file()), None)


def read_test_items(root: Path, concept: str, cfg: DataConfig | None = None) -> list[TestItem] | None:
    """``test_data/<c>.json`` as ``eval/eval_p_mmu.py`` reads it (list of {"image", "type", "conversations": [human,
    gpt]}); image paths are resolved against the dataset root (absolute paths from another machine are re-rooted at
    their ``concept/`` part). None when the file is absent."""
    path = root / "test_data" / f"{concept}.json"
    raw = read_json(path, required=False, cfg=cfg)
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a list of test items")
    out = []
    for i, it in enumerate(raw):
        w = f"{path}: item [{i}]"
        if not isinstance(it, dict):
            raise DatasetError(f"{w} must be an object with 'image', 'type', 'conversations'")
        t, img, conv = it.get("type"), it.get("image"), it.get("conversations")
        if not isinstance(t, str) or not (t in TEST_ITEM_TYPES or "choice" in t):
            raise DatasetError(f"{w}: field 'type' must be one of {TEST_ITEM_TYPES} or contain 'choice', got {t!r}")
        if not isinstance(img, str) or not img.strip():
            raise DatasetError(f"{w}: field 'image' must be a path string, got {img!r}")
        if (not isinstance(conv, list) or len(conv) < 2
                or not all(isinstance(c, dict) and isinstance(c.get("value"), str) for c in conv[:2])):
            raise DatasetError(f"{w}: field 'conversations' must hold a human and a gpt turn with string 'value'")
        resolved = _resolve_test_image(img, root, concept)
        if resolved is None:
            raise DatasetError(f"{w}: image {img!r} not found under {root}")
        out.append(TestItem(t, resolved.resolve(), conv[0]["value"].replace("<image>\n", ""), conv[1]["value"]))
    return out
