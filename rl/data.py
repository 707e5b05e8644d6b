"""Reader for the UniCTokens / UnifyBench++ concept dataset layout (typed records, strict errors).

Layout (``root/``)::

    concepts_list.json                 ["bo", ...]
    black_512x512.png                  image input of text-only tasks
    random_images/*.png                optional easy negatives
    prompts_to_eval.json               optional, eval only: {"object"|"live_subject": ["a <sks> ...", ...]}
    concept/train/<c>/
        *.png|jpg|...                  training images (at least one)
        cropped/                       optional subject crops (fallback: the training images)
        info.json                      {"class", "category": human|animal|object, "info", "extra_info": [...],
                                        optional "generation_type", "conversation_type"}
        conversations.json             {"<image file>": [{"query", "answer"}, ...]}
        reasoning.json                 optional: [{"prompt": "... <c> ...", "answer_index": i} |
                                                  {"prompt": ..., "answer": "<exact extra_info item>"}]
        positive_recognitions.json     optional, same QA forms as below
        random_recognitions.json       optional
        negative_example/              optional hard negatives (+ score.json, ignored)
    concept/test/<c>/                  EVALUATION ONLY (D14), read with include_test=True
        *.png, vqa.json, text_only.json, t2i_conditions.json (list of prompts or
        {"personalized_driven_generation": [...], ...})

``reasoning.json`` is this service's schema for the training reasoning prompts IP and their answer items
(UnifyBench++ pairs each training extra_info item with a reasoning prompt; ``answer_index`` is 0-based into
``extra_info``). QA collections are accepted as a list of ``{"query", "answer"[, "image"]}`` or a dict
``image -> list of {"query", "answer"}``. Every problem raises :class:`DatasetError` naming the file and
field; broken images name the file and are never skipped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DatasetError", "DataConfig", "ImageRef", "QA", "ReasoningPrompt", "ConceptInfo", "ConceptTrain",
           "ConceptTest", "Concept", "ConceptDataset", "load_concept_dataset", "load_image", "CATEGORIES"]

CATEGORIES = ("human", "animal", "object")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
T2I_DEFAULT_KEY = "personalized_driven_generation"


class DatasetError(ValueError):
    """A missing or malformed dataset file; the message names the file and field."""


@dataclass
class DataConfig:
    """Dataset reader settings."""

    max_image_pixels: int = 4096 * 4096
    """Images with more pixels are rejected (wrong file / decompression bomb)."""
    min_image_side: int = 8
    """Images with a smaller side are rejected as empty."""
    verify_images: bool = True
    """Decode every image once at load time so a broken file fails early (images are then loaded lazily)."""

    @classmethod
    def tiny(cls) -> "DataConfig":
        """Tiny setting (the sample data): same checks, smaller pixel cap."""
        return cls(max_image_pixels=1024 * 1024)


def load_image(path: Path, cfg: DataConfig | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; DatasetError naming the file if broken/empty/huge."""
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
                raise DatasetError(f"{path}: image is {w}x{h} = {w * h} pixels, above DataConfig.max_image_pixels"
                                   f"={cfg.max_image_pixels}")
            if min(w, h) < cfg.min_image_side:
                raise DatasetError(f"{path}: image is {w}x{h}, smaller than DataConfig.min_image_side="
                                   f"{cfg.min_image_side} (empty image?)")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: image too large ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class ImageRef:
    """A dataset image, decoded on demand with :meth:`load`."""

    path: Path
    """Absolute path of the image file."""
    max_pixels: int = DataConfig.max_image_pixels
    """Pixel cap applied when loading."""

    @property
    def name(self) -> str:
        """File name (e.g. "3.png"), the key conversations.json uses."""
        return self.path.name

    def load(self) -> np.ndarray:
        """uint8 RGB [H, W, 3]."""
        return load_image(self.path, DataConfig(max_image_pixels=self.max_pixels))


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
    """A training reasoning prompt IP and the extra_info item it asks for."""

    prompt: str
    """Generation-style prompt mentioning "<c>", e.g. "A photo of <c> at the beach."."""
    answer_index: int
    """0-based index of the matching item in ConceptInfo.extra_info."""


@dataclass
class ConceptInfo:
    """Profile from info.json."""

    name: str
    """Concept name (folder name), without brackets."""
    class_word: str
    """Class word ("man", "cat", "cup"): replaces "<c>" in reward prompts (D8)."""
    category: str
    """"human" | "animal" | "object" (explicit info.json field, D8)."""
    info: str
    """One-sentence profile, "<c> is ..."."""
    extra_info: list[str]
    """Attribute facts (candidates of the text-only reasoning task)."""
    generation_type: str
    """"object" | "live_subject" (key into prompts_to_eval.json); derived from category if absent."""
    conversation_type: str | None = None
    """UniCTokens' conversation_type, if given."""

    @property
    def token(self) -> str:
        """The concept identifier string, "<name>"."""
        return f"<{self.name}>"


@dataclass
class ConceptTrain:
    """Training-side data of one concept (D14: the only side training reads)."""

    images: list[ImageRef]
    """Training photos."""
    cropped: list[ImageRef]
    """Subject crops (= images when cropped/ is absent)."""
    conversations: dict[str, list[QA]]
    """Image file name -> QA pairs about that image."""
    reasoning: list[ReasoningPrompt]
    """Training reasoning prompts (empty when reasoning.json is absent)."""
    positive_recognitions: list[QA] = field(default_factory=list)
    """Positive recognition QA (not used by GRPO)."""
    random_recognitions: list[QA] = field(default_factory=list)
    """Negative recognition QA (not used by GRPO)."""
    negative_examples: list[ImageRef] = field(default_factory=list)
    """Hard negatives."""

    def image(self, name: str) -> ImageRef:
        """The training image with this file name."""
        for ref in self.images:
            if ref.name == name:
                return ref
        raise DatasetError(f"no training image named {name!r}")


@dataclass
class ConceptTest:
    """Evaluation-side data of one concept."""

    images: list[ImageRef]
    """Test photos."""
    vqa: list[QA]
    """VQA pairs (image = file name)."""
    text_only: list[QA]
    """Text-only QA."""
    t2i_conditions: dict[str, list[str]]
    """Knowledge-driven T2I prompts; list-form files land under "personalized_driven_generation"."""


@dataclass
class Concept:
    """One concept: profile, training data, and (only when asked for) test data."""

    info: ConceptInfo
    """Profile."""
    train: ConceptTrain
    """Training data."""
    test: ConceptTest | None = None
    """Test data (include_test=True only)."""

    @property
    def name(self) -> str:
        """Concept name."""
        return self.info.name


@dataclass
class ConceptDataset:
    """A loaded dataset root."""

    root: Path
    """Dataset root."""
    concepts: dict[str, Concept]
    """Loaded concepts by name, in concepts_list.json order."""
    black_image: ImageRef
    """The black placeholder (image input of text-only tasks)."""
    random_images: list[ImageRef] = field(default_factory=list)
    """Easy negatives."""
    eval_prompts: dict[str, list[str]] = field(default_factory=dict)
    """prompts_to_eval.json (include_test=True only)."""

    def concept(self, name: str) -> Concept:
        """The concept named ``name`` (DatasetError if it was not loaded)."""
        if name not in self.concepts:
            raise DatasetError(f"unknown concept {name!r}; loaded: {sorted(self.concepts)}")
        return self.concepts[name]

    def black(self) -> np.ndarray:
        """The black placeholder as uint8 [H, W, 3]."""
        return self.black_image.load()


# ------------------------------------------------------------------------------------------ helpers
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: required file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from e


def _str(obj: dict, key: str, path: Path, where: str = "", required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise DatasetError(f"{path}: missing field {where}{key!r}")
        return None
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise DatasetError(f"{path}: field {where}{key!r} must be a non-empty string, got {v!r}")
    return v.strip()


def _natural_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def _images_in(folder: Path, cfg: DataConfig) -> list[ImageRef]:
    if not folder.is_dir():
        return []
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
                   key=_natural_key)
    refs = [ImageRef(p.resolve(), cfg.max_image_pixels) for p in files]
    if cfg.verify_images:
        for r in refs:
            load_image(r.path, cfg)
    return refs


def _qa_list(items: Any, path: Path, where: str, image: str | None = None) -> list[QA]:
    if not isinstance(items, list):
        raise DatasetError(f"{path}: {where} must be a list of {{'query', 'answer'}} objects")
    out = []
    for i, it in enumerate(items):
        w = f"{where}[{i}]."
        if not isinstance(it, dict):
            raise DatasetError(f"{path}: {where}[{i}] must be an object with 'query' and 'answer'")
        img = _str(it, "image", path, w, required=False) or image
        out.append(QA(_str(it, "query", path, w), _str(it, "answer", path, w), img))
    return out


def _qa_collection(data: Any, path: Path) -> list[QA]:
    """A list of QA objects, or a dict image -> list of QA objects."""
    if isinstance(data, dict):
        return [qa for k, v in data.items() for qa in _qa_list(v, path, f"[{k!r}]", image=k)]
    return _qa_list(data, path, "top level")


# ------------------------------------------------------------------------------------------ readers
def _read_info(name: str, folder: Path) -> ConceptInfo:
    path = folder / "info.json"
    d = _read_json(path)
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    category = _str(d, "category", path)
    if category not in CATEGORIES:
        raise DatasetError(f"{path}: field 'category' must be one of {CATEGORIES}, got {category!r}")
    extra = d.get("extra_info")
    if not isinstance(extra, list) or not all(isinstance(x, str) and x.strip() for x in extra):
        raise DatasetError(f"{path}: field 'extra_info' must be a list of non-empty strings")
    extra = [x.strip() for x in extra]
    for i, x in enumerate(extra):
        if x in extra[:i]:
            raise DatasetError(f"{path}: field 'extra_info'[{i}] duplicates an earlier item: {x!r}")
    gen = _str(d, "generation_type", path, required=False) or ("object" if category == "object"
                                                                 else "live_subject")
    return ConceptInfo(name=name, class_word=_str(d, "class", path), category=category,
                       info=_str(d, "info", path), extra_info=extra, generation_type=gen,
                       conversation_type=_str(d, "conversation_type", path, required=False))


def _read_conversations(folder: Path, images: list[ImageRef]) -> dict[str, list[QA]]:
    path = folder / "conversations.json"
    d = _read_json(path)
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected an object mapping image file name -> list of QA")
    by_name = {r.name: r.name for r in images}
    by_stem = {r.path.stem: r.name for r in images}
    out: dict[str, list[QA]] = {}
    for key, items in d.items():
        base = Path(str(key)).name
        img = by_name.get(base) or by_stem.get(base) or by_stem.get(Path(base).stem)
        if img is None:
            raise DatasetError(f"{path}: key {key!r} matches no training image in {folder} "
                               f"(have {sorted(by_name)})")
        out.setdefault(img, []).extend(_qa_list(items, path, f"[{key!r}]", image=img))
    if not any(out.values()):
        raise DatasetError(f"{path}: no question-answer pairs")
    return out


def read_reasoning(folder: Path, info: ConceptInfo) -> list[ReasoningPrompt]:
    """``<folder>/reasoning.json`` ({prompt, answer_index | answer} items) checked against ``info.extra_info``."""
    path = folder / "reasoning.json"
    if not path.exists():
        return []
    d = _read_json(path)
    if not isinstance(d, list):
        raise DatasetError(f"{path}: expected a list of {{'prompt', 'answer_index'|'answer'}} objects")
    out = []
    for i, it in enumerate(d):
        w = f"[{i}]."
        if not isinstance(it, dict):
            raise DatasetError(f"{path}: item [{i}] must be an object")
        prompt = _str(it, "prompt", path, w)
        if info.token not in prompt:
            raise DatasetError(f"{path}: field {w}'prompt' must mention {info.token}: {prompt!r}")
        idx = it.get("answer_index")
        ans = _str(it, "answer", path, w, required=False)
        if idx is None and ans is None:
            raise DatasetError(f"{path}: item [{i}] needs 'answer_index' or 'answer'")
        if ans is not None:
            if ans not in info.extra_info:
                raise DatasetError(f"{path}: field {w}'answer' is not an item of info.json extra_info: {ans!r}")
            if idx is not None and info.extra_info.index(ans) != idx:
                raise DatasetError(f"{path}: item [{i}] 'answer' and 'answer_index' disagree")
            idx = info.extra_info.index(ans)
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(info.extra_info):
            raise DatasetError(f"{path}: field {w}'answer_index'={idx!r} is not an index into info.json "
                               f"extra_info (0..{len(info.extra_info) - 1})")
        out.append(ReasoningPrompt(prompt, idx))
    return out


def _read_optional_qa(path: Path) -> list[QA]:
    return _qa_collection(_read_json(path), path) if path.exists() else []


def _read_train(name: str, folder: Path, cfg: DataConfig) -> tuple[ConceptInfo, ConceptTrain]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training folder of concept {name!r} is missing")
    info = _read_info(name, folder)
    images = _images_in(folder, cfg)
    if not images:
        raise DatasetError(f"{folder}: no training images ({'/'.join(IMAGE_EXTS)})")
    train = ConceptTrain(
        images=images, cropped=_images_in(folder / "cropped", cfg) or list(images),
        conversations=_read_conversations(folder, images), reasoning=read_reasoning(folder, info),
        positive_recognitions=_read_optional_qa(folder / "positive_recognitions.json"),
        random_recognitions=_read_optional_qa(folder / "random_recognitions.json"),
        negative_examples=_images_in(folder / "negative_example", cfg))
    return info, train


def _read_test(name: str, folder: Path, cfg: DataConfig) -> ConceptTest:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: test folder of concept {name!r} is missing")
    path = folder / "t2i_conditions.json"
    raw = _read_json(path)
    raw = {T2I_DEFAULT_KEY: raw} if isinstance(raw, list) else raw
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a list of prompts or an object of prompt lists")
    t2i = {}
    for k, v in raw.items():
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise DatasetError(f"{path}: field {k!r} must be a list of non-empty prompt strings")
        t2i[k] = [x.strip() for x in v]
    return ConceptTest(images=_images_in(folder, cfg), vqa=_qa_collection(_read_json(folder / "vqa.json"),
                                                                         folder / "vqa.json"),
                       text_only=_qa_collection(_read_json(folder / "text_only.json"), folder / "text_only.json"),
                       t2i_conditions=t2i)


def load_concept_dataset(root: str | Path, concepts: list[str] | None = None, *, include_test: bool = False,
                         config: DataConfig | None = None) -> ConceptDataset:
    """Load ``root`` (all concepts of concepts_list.json, or only ``concepts``).

    Training code calls this with ``include_test=False`` (D14); evaluation passes True to also read
    ``concept/test/<c>/`` and ``prompts_to_eval.json``. Raises DatasetError naming file and field.
    """
    cfg = config or DataConfig()
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    list_path = root / "concepts_list.json"
    names = _read_json(list_path)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"{list_path}: expected a non-empty list of concept names")
    if len(set(names)) != len(names):
        raise DatasetError(f"{list_path}: duplicate concept names")
    wanted = list(names) if concepts is None else list(concepts)
    for n in wanted:
        if n not in names:
            raise DatasetError(f"unknown concept {n!r}: not in {list_path} (known: {names})")
    black = root / "black_512x512.png"
    load_image(black, cfg)
    out: dict[str, Concept] = {}
    for n in wanted:
        info, train = _read_train(n, root / "concept" / "train" / n, cfg)
        test = _read_test(n, root / "concept" / "test" / n, cfg) if include_test else None
        out[n] = Concept(info, train, test)
    eval_prompts: dict[str, list[str]] = {}
    ep = root / "prompts_to_eval.json"
    if include_test and ep.exists():
        eval_prompts = _read_json(ep)
        if not isinstance(eval_prompts, dict) or not all(isinstance(v, list) for v in eval_prompts.values()):
            raise DatasetError(f"{ep}: expected an object of prompt lists")
    return ConceptDataset(root=root, concepts=out, black_image=ImageRef(black.resolve(), cfg.max_image_pixels),
                          random_images=_images_in(root / "random_images", cfg), eval_prompts=eval_prompts)
