"""The concept dataset as the released UniCTokens / UnifyBench++ code ships and reads it (typed records, strict errors).

Layout (``root/``) and how each part is read (file-level readers in :mod:`rl.data.files`)::

    concepts_list.json               ["bo", ...]; names: letters, digits, _ and - only
    black_512x512.png                image input of text-only tasks
    random_images/                   optional easy negatives (Rec.)
    concept/train/train_images.json  {c: [file, ...]}: the reference images of the CLIP / face rewards and of
                                     CLIP-I / face evaluation (released clip_eval.py, pdata.py); absent → every
                                     training image
    concept/train/<c>/
        *.png|jpg|jpeg               training photos; names containing "mask" are skipped (pdata.py)
        cropped/                     subject crops (T2I injection); fallback: the training photos
        info.json                    {"class", "info", "extra_info": [...], "conversation_type",
                                      "generation_type"}; optional "category" (else derived, see
                                      rl.data.files.derive_category)
        conversations.json           {key: [{"query", "answer"}, ...]}: an image takes the first key that is a
                                     substring of its path (grpo.py); needed for visual-instruct tasks
        reasoning.json               OPTIONAL override of the training reasoning prompts:
                                     [{"prompt", "answer_index" | "answer"}]
        positive_recognitions.json, random_recognitions.json, negative_example/   optional (injection)
    concept/test/<c>/
        t2i_conditions.json          {"personalized_driven_generation": [...], ...} or a plain list. The FIRST
                                     int((n+1)/2) prompts are the training reasoning prompts IP, paired by index
                                     with extra_info (grpo.py); the rest are held out (Rea., Rea. Gen.)
        *.png, vqa.json, text_only.json   evaluation only (optional when test_data/<c>.json exists)
    test_data/<c>.json               evaluation items of gen_test_data.py, read as eval/eval_p_mmu.py reads them

Training reads ``concept/train`` and only the training half of ``t2i_conditions.json``; the rest of ``concept/test``,
``test_data`` and ``prompts_to_eval.json`` (a config field, ``eval.prompts_to_eval``) are read with
``include_test=True`` only. Every problem raises :class:`DatasetError` naming the file and field; broken images
name the file and are never skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rl.data.files import (
    CATEGORIES,
    QA,
    T2I_DEFAULT_KEY,
    DataConfig,
    DatasetError,
    ReasoningPrompt,
    TestItem,
    check_concept_name,
    derive_category,
    image_files,
    load_image,
    match_conversation_keys,
    read_json,
    read_t2i_conditions,
    read_test_items,
    read_train_images,
    split_reasoning,
)

log = logging.getLogger(__name__)

__all__ = ["DatasetError", "DataConfig", "ImageRef", "QA", "ReasoningPrompt", "TestItem", "ConceptInfo",
           "ConceptTrain", "ConceptTest", "Concept", "ConceptDataset", "load_concept_dataset", "load_dataset",
           "load_image", "read_reasoning", "check_training_use", "CATEGORIES", "T2I_DEFAULT_KEY"]


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
class ConceptInfo:
    """Profile from info.json."""

    name: str
    """Concept name (folder name), without brackets."""
    class_word: str
    """Class word ("man", "cat", "cup"): replaces "<c>" in reward prompts (D8)."""
    category: str
    """"human" | "animal" | "object": info.json's "category", else derived (:func:`rl.data.files.derive_category`)."""
    info: str
    """One-sentence profile, "<c> is ..."."""
    extra_info: list[str]
    """Attribute facts (candidates of the text-only reasoning task)."""
    generation_type: str
    """"object" | "live_subject" (key into prompts_to_eval.json); derived from category if absent."""
    conversation_type: str | None = None
    """UniCTokens' conversation_type, if given."""
    category_source: str = "category"
    """Which info.json field decided ``category`` ("category", "conversation_type/class", "conversation_type",
    "generation_type")."""

    @property
    def token(self) -> str:
        """The concept identifier string, "<name>"."""
        return f"<{self.name}>"


@dataclass
class ConceptTrain:
    """Training-side data of one concept (D14: the only side training reads)."""

    images: list[ImageRef]
    """Training photos (every image of the concept folder except "mask" files)."""
    cropped: list[ImageRef]
    """Subject crops (= images when cropped/ is absent)."""
    references: list[ImageRef]
    """Reference images of the CLIP / face rewards and CLIP-I / face evaluation: train_images.json's list for the
    concept, or every training photo when that file is absent."""
    conversations: dict[str, list[QA]]
    """Image file name -> QA pairs about that image (images without a matching conversations.json key are absent)."""
    reasoning: list[ReasoningPrompt]
    """Training reasoning prompts: reasoning.json if present, else the training half of t2i_conditions.json."""
    reasoning_source: str = "t2i_conditions"
    """Where ``reasoning`` came from: "reasoning.json", "t2i_conditions" or "none"."""
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
    """VQA pairs (image = file name) from vqa.json ([] when absent)."""
    text_only: list[QA]
    """Text-only QA from text_only.json ([] when absent)."""
    t2i_conditions: dict[str, list[str]]
    """Knowledge-driven T2I prompts; list-form files land under "personalized_driven_generation"."""
    held_out: list[ReasoningPrompt] = field(default_factory=list)
    """Held-out reasoning prompts with their fact (Rea., Rea. Gen.): test/<c>/reasoning.json if present, else the
    second part of t2i_conditions.json's personalized-driven prompts, index-paired with extra_info."""
    unpaired: list[str] = field(default_factory=list)
    """Held-out personalized-driven prompts past the end of extra_info (no fact to score against)."""
    items: list[TestItem] | None = None
    """test_data/<c>.json items (Rec. / VQA / QA / choice as eval_p_mmu.py); None when the file is absent."""


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

    def concept(self, name: str) -> Concept:
        """The concept named ``name`` (DatasetError if it was not loaded)."""
        if name not in self.concepts:
            raise DatasetError(f"unknown concept {name!r}; loaded: {sorted(self.concepts)}")
        return self.concepts[name]

    def black(self) -> np.ndarray:
        """The black placeholder as uint8 [H, W, 3]."""
        return self.black_image.load()


# ------------------------------------------------------------------------------------------ helpers
def _str(obj: dict, key: str, path: Path, where: str = "", required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise DatasetError(f"{path}: missing field {where}{key!r}")
        return None
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise DatasetError(f"{path}: field {where}{key!r} must be a non-empty string, got {v!r}")
    return v.strip()


def _refs(paths: list[Path], cfg: DataConfig) -> list[ImageRef]:
    refs = [ImageRef(p.resolve(), cfg.max_image_pixels) for p in paths]
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


def _read_optional_qa(path: Path, cfg: DataConfig | None = None) -> list[QA]:
    return _qa_collection(read_json(path, cfg=cfg), path) if path.exists() else []


# ------------------------------------------------------------------------------------------ readers
def _read_info(name: str, folder: Path, cfg: DataConfig | None = None) -> ConceptInfo:
    path = folder / "info.json"
    d = read_json(path, cfg=cfg)
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(d).__name__}")
    category, source = derive_category(d, path)
    extra = d.get("extra_info", [])
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
                       conversation_type=_str(d, "conversation_type", path, required=False), category_source=source)


def _read_conversations(root: Path, folder: Path, images: list[ImageRef], cfg: DataConfig | None = None
                        ) -> dict[str, list[QA]]:
    """Image file name -> QA list; keys matched to images as the released grpo.py does (substring of the path)."""
    path = folder / "conversations.json"
    d = read_json(path, required=False, cfg=cfg)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected an object mapping an image key -> list of QA, got {type(d).__name__}")
    qa = {str(k): _qa_list(v, path, f"[{k!r}]") for k, v in d.items()}
    rel = {str(r.path.relative_to(root)): r.name for r in images}
    matched, unused = match_conversation_keys(list(qa), list(rel))
    if unused:
        log.warning("%s: %d key(s) match no training image and are unused: %s", path, len(unused), unused[:5])
    out = {rel[p]: [QA(x.query, x.answer, rel[p]) for x in qa[k]] for p, k in matched.items() if qa[k]}
    return out


def read_reasoning(folder: Path, info: ConceptInfo, cfg: DataConfig | None = None) -> list[ReasoningPrompt] | None:
    """``<folder>/reasoning.json`` ({prompt, answer_index | answer} items) checked against ``info.extra_info``;
    None when the file is absent (the optional override of the t2i_conditions pairing)."""
    path = folder / "reasoning.json"
    if not path.exists():
        return None
    d = read_json(path, cfg=cfg)
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


def _personalized_split(root: Path, info: ConceptInfo, cfg: DataConfig
                        ) -> tuple[list[ReasoningPrompt], list[ReasoningPrompt], list[str], dict[str, list[str]]]:
    path = root / "concept" / "test" / info.name / "t2i_conditions.json"
    t2i = read_t2i_conditions(path, required=False, cfg=cfg)
    prompts = t2i.get(T2I_DEFAULT_KEY, [])
    train, held, unpaired = split_reasoning(prompts, info.extra_info, cfg.reasoning_train_fraction)
    for rp in train:
        if info.token not in rp.prompt:
            raise DatasetError(f"{path}: field '{T2I_DEFAULT_KEY}'[{prompts.index(rp.prompt)}] is a training "
                               f"reasoning prompt and must mention {info.token}: {rp.prompt!r}")
    return train, held, unpaired, t2i


def _read_train(root: Path, name: str, cfg: DataConfig, train_images: dict[str, list[str]] | None,
                splits: dict | None = None) -> tuple[ConceptInfo, ConceptTrain]:
    """The concept's info and training side; ``splits`` (optional) receives the t2i_conditions split it read, so
    the held-out side does not read and split the file again."""
    folder = root / "concept" / "train" / name
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training folder of concept {name!r} is missing")
    info = _read_info(name, folder, cfg)
    images = _refs(image_files(folder), cfg)
    if not images:
        raise DatasetError(f"{folder}: no training images (png/jpg/jpeg/webp/bmp, names without 'mask')")
    if train_images is None:
        references = list(images)
    else:
        ti = root / "concept" / "train" / "train_images.json"
        if name not in train_images:
            raise DatasetError(f"{ti}: no entry for concept {name!r}")
        missing = [f for f in train_images[name] if not (folder / f).is_file()]
        if missing:
            raise DatasetError(f"{ti}: field {name!r} lists image(s) not in {folder}: {missing[:3]}")
        references = _refs([folder / f for f in train_images[name]], cfg)
        if not references:
            raise DatasetError(f"{ti}: field {name!r} lists no reference image")
    override = read_reasoning(folder, info, cfg)
    if override is not None:
        reasoning, source = override, "reasoning.json"
    else:
        split = _personalized_split(root, info, cfg)
        if splits is not None:
            splits[name] = split
        reasoning = split[0]
        source = "t2i_conditions" if reasoning else "none"
    train = ConceptTrain(
        images=images, cropped=_refs(image_files(folder / "cropped"), cfg) or list(images), references=references,
        conversations=_read_conversations(root, folder, images, cfg), reasoning=reasoning, reasoning_source=source,
        positive_recognitions=_read_optional_qa(folder / "positive_recognitions.json", cfg),
        random_recognitions=_read_optional_qa(folder / "random_recognitions.json", cfg),
        negative_examples=_refs(image_files(folder / "negative_example"), cfg))
    return info, train


def _read_test(root: Path, info: ConceptInfo, cfg: DataConfig, split: tuple | None = None) -> ConceptTest:
    folder = root / "concept" / "test" / info.name
    items = read_test_items(root, info.name, cfg)
    if not folder.is_dir() and items is None:
        raise DatasetError(f"{folder}: test folder of concept {info.name!r} is missing (and no test_data/"
                           f"{info.name}.json)")
    _, held, unpaired, t2i = split or _personalized_split(root, info, cfg)
    override = read_reasoning(folder, info, cfg)
    if override is not None:
        held, unpaired = override, []
    vqa_path, qa_path = folder / "vqa.json", folder / "text_only.json"
    if items is not None and cfg.verify_images:
        for it in items:
            load_image(it.image, cfg)
    return ConceptTest(images=_refs(image_files(folder), cfg), vqa=_read_optional_qa(vqa_path, cfg),
                       text_only=_read_optional_qa(qa_path, cfg), t2i_conditions=t2i, held_out=held, unpaired=unpaired,
                       items=items)


def check_training_use(dataset: "ConceptDataset", text_task_ratio: float) -> None:
    """DatasetError before any work when a concept cannot supply the tasks the run will draw: text-only tasks
    (``text_task_ratio > 0``) need extra_info and reasoning prompts; visual tasks (``< 1``) need a training photo
    with conversations.json pairs."""
    for name, c in dataset.concepts.items():
        base = dataset.root / "concept"
        if text_task_ratio > 0:
            if not c.info.extra_info:
                raise DatasetError(f"{base}/train/{name}/info.json: field 'extra_info' is empty, but text-only "
                                   f"tasks are on (data.text_task_ratio={text_task_ratio}; set it to 0)")
            if not c.train.reasoning:
                raise DatasetError(f"{base}/test/{name}/t2i_conditions.json: no '{T2I_DEFAULT_KEY}' prompts pair "
                                   f"with extra_info (and no train/{name}/reasoning.json), but text-only tasks "
                                   f"are on (data.text_task_ratio={text_task_ratio}; set it to 0)")
        if text_task_ratio < 1 and not c.train.conversations:
            raise DatasetError(f"{base}/train/{name}/conversations.json: no question-answer pairs for any training "
                               f"photo, but visual tasks are on (data.text_task_ratio={text_task_ratio}; set it "
                               "to 1)")


def load_concept_dataset(root: str | Path, concepts: list[str] | None = None, *, include_test: bool = False,
                         config: DataConfig | None = None) -> ConceptDataset:
    """Load ``root`` (all concepts of concepts_list.json, or only ``concepts``).

    Training code calls this with ``include_test=False``; evaluation passes True to also read the held-out side
    (``concept/test/<c>/``, ``test_data/<c>.json``). Raises DatasetError naming file and field.
    """
    cfg = config or DataConfig()
    cfg.validate()
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    list_path = root / "concepts_list.json"
    names = read_json(list_path, cfg=cfg)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{list_path}: expected a non-empty list of concept names")
    for i, n in enumerate(names):
        check_concept_name(n, f"{list_path}: item [{i}]")
    if len(set(names)) != len(names):
        raise DatasetError(f"{list_path}: duplicate concept names")
    wanted = list(names) if concepts is None else list(concepts)
    for n in wanted:
        check_concept_name(n, "data.concepts")
        if n not in names:
            raise DatasetError(f"unknown concept {n!r}: not in {list_path} (known: {names})")
    black = root / "black_512x512.png"
    load_image(black, cfg)
    train_images = read_train_images(root, cfg)
    out: dict[str, Concept] = {}
    splits: dict = {}
    for n in wanted:
        info, train = _read_train(root, n, cfg, train_images, splits)
        out[n] = Concept(info, train, _read_test(root, info, cfg, splits.get(n)) if include_test else None)
    return ConceptDataset(root=root, concepts=out, black_image=ImageRef(black.resolve(), cfg.max_image_pixels),
                          random_images=_refs(image_files(root / "random_images"), cfg))


def load_dataset(data_cfg: Any, include_test: bool = False) -> ConceptDataset:
    """The dataset of a run's ``data`` config section (``root``, ``concepts``, ``reader``): every role loads it
    through here so ``data.reader`` applies everywhere."""
    return load_concept_dataset(data_cfg.root, concepts=list(data_cfg.concepts) or None, include_test=include_test,
                                config=data_cfg.reader)
