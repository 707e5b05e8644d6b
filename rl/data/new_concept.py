"""A user's own concept, from a folder of photos to the released UniCTokens layout (``python -m launch.new_concept``).

:func:`build_new_concept` runs in three phases, and writes only in the last:

1. **check**: the name (:func:`rl.data.files.check_concept_name`), the data root (a UniCTokens root with
   ``concepts_list.json``, or a new / empty folder), an existing concept of that name (refused without ``force``),
   the photos (:func:`rl.data.photos.check_photos`: decodable, size bounds, near-duplicates, enough usable, faces for
   a human) and the profile / facts (:mod:`rl.data.concept_text`);
2. **plan**: the text (offline templates, or the VLM writer) and every file's bytes in memory, then the plan is
   written to a scratch root and read back with :func:`rl.data.reader.load_concept_dataset` (``include_test``) and
   :func:`rl.data.reader.check_training_use`, so a concept the reader would refuse is never written;
3. **commit**: the concept's folders are staged inside the data root and renamed into place (an old concept of the
   same name, with ``force``, is swapped out and deleted afterwards), then ``test_data/<c>.json``,
   ``concept/train/train_images.json`` and last ``concepts_list.json`` are replaced atomically.

Files of concept ``c`` (photos renamed ``0.png``, ``1.png``, … — digit stems, as the released ``get_image_path``
needs)::

    concept/train/<c>/{0..n-1}.png          training photos (longer side at most max_side)
    concept/train/<c>/cropped/{0..n-1}.png  centred square crops, or head-and-shoulders face crops for a human
    concept/train/<c>/info.json             class, category, conversation_type, generation_type, info, extra_info
    concept/train/<c>/conversations.json    {photo: [{query, answer}]}
    concept/train/<c>/captions.json         {photo: caption} (pdata.py's caption-training file)
    concept/train/<c>/positive_recognitions.json, random_recognitions.json
    concept/test/<c>/{0..k-1}.png           held-out test photos
    concept/test/<c>/t2i_conditions.json    {"personalized_driven_generation": one reasoning prompt per fact}
    concept/test/<c>/vqa.json, text_only.json
    test_data/<c>.json                      Rec. / VQA / text-only items (eval_p_mmu.py)
    concept/train/train_images.json         + the concept's reference photos (a human's: those with a face)
    concepts_list.json                      + the concept's name
    black_512x512.png, random_images/       only in a new root
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from rl.data.concept_text import ConceptBrief, ConceptText, TextError, normalise_facts, normalise_profile
from rl.data.files import CATEGORIES, DatasetError, check_concept_name, image_files, read_json, read_train_images
from rl.data.layout import (
    BLACK_NAME,
    black_image,
    info_record,
    json_bytes,
    png_bytes,
    random_images,
    recognition_records,
    t2i_conditions_record,
    test_data_items,
)
from rl.data.photos import Photo, PhotoError, PhotoLimits, check_photos, centre_square, face_square

__all__ = ["NewConceptRequest", "NewConceptResult", "ConceptError", "build_new_concept", "plan_files",
           "resolve_category"]


class ConceptError(ValueError):
    """The concept cannot be built; one line naming the problem (nothing was written)."""


@dataclass
class NewConceptRequest:
    """Everything ``launch.new_concept`` was asked for."""

    photos: Path
    """Folder of the concept's photos."""
    name: str
    """Concept name: letters, digits, ``_``, ``-``."""
    class_word: str
    """Class word ("dog", "mug", "woman")."""
    data_root: Path
    """UniCTokens data root to add the concept to (created when absent)."""
    category: str | None = None
    """human | animal | object; None: human when the released rule says so ("man" in the class word), else an
    error asking for it."""
    profile: str | None = None
    """One-sentence profile (else written by the VLM, or "<c> is a <class>.")."""
    facts: list[str] = field(default_factory=list)
    """Extra facts (``extra_info``)."""
    facts_source: str = "--facts"
    """Where the facts came from (named in errors)."""
    force: bool = False
    """Replace an existing concept of the same name."""
    limits: PhotoLimits = field(default_factory=PhotoLimits)
    """Photo checks."""
    max_side: int = 1024
    """Longer side of the written training / test photos (larger photos are scaled down)."""
    crop_size: int = 512
    """Side of the ``cropped/`` squares."""
    text_task_ratio: float = 0.5
    """The GRPO job's ``data.text_task_ratio`` the concept is checked against (0 when there are no facts)."""


@dataclass
class NewConceptResult:
    """What was written."""

    root: Path
    """The data root."""
    name: str
    """The concept."""
    category: str
    """Its category."""
    files: list[tuple[str, int]]
    """(path relative to the root, bytes) of every file written, sorted."""
    train_photos: int
    """Training photos written."""
    test_photos: int
    """Test photos written."""
    references: list[str]
    """train_images.json's list for the concept."""
    text_source: str
    """"templates" or the VLM."""
    refused: dict[str, str]
    """Photos left out, and why."""
    facts: int
    """Number of facts (text-only tasks need at least one)."""


def resolve_category(class_word: str, category: str | None, log: Callable[[str], None]) -> str:
    """The concept's category: ``category`` if given (with a warning where the released ``'man' in class`` rule,
    which picks the face reward in the released code, disagrees), else human when that rule says so, else
    ConceptError asking for ``--category``."""
    released_human = "man" in class_word.lower()
    if category is None:
        if released_human:
            return "human"
        raise ConceptError(f"--category is needed: the class word {class_word!r} does not decide it (human, animal "
                           "or object)")
    if category not in CATEGORIES:
        raise ConceptError(f"--category must be one of {CATEGORIES}, got {category!r}")
    if released_human != (category == "human"):
        log(f"  note: the released code calls a concept human when 'man' is in its class word ({class_word!r}: "
            f"{'yes' if released_human else 'no'}); this service uses info.json's explicit category {category!r}")
    return category


def _check_root(root: Path, name: str, force: bool) -> tuple[list[str], bool]:
    """(concept names of the root, whether the root is new); ConceptError for a folder that is not a UniCTokens root
    or an existing concept without ``force``."""
    if root.exists() and not root.is_dir():
        raise ConceptError(f"--data-root {root}: not a directory")
    list_path = root / "concepts_list.json"
    if not list_path.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise ConceptError(f"--data-root {root}: not empty and has no concepts_list.json (not a UniCTokens data "
                               "root); give a new folder or an existing root")
        return [], True
    try:
        names = read_json(list_path)
        read_train_images(root)
    except DatasetError as e:
        raise ConceptError(str(e)) from e
    if not isinstance(names, list):
        raise ConceptError(f"{list_path}: expected a list of concept names")
    exists = name in names or any((root / "concept" / side / name).exists() for side in ("train", "test"))
    if exists and not force:
        raise ConceptError(f"--data-root {root}: concept {name!r} already exists (concepts_list.json or "
                           f"concept/*/{name}); use --force to replace it")
    return names, False


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    s = min(1.0, max_side / max(rgb.shape[:2]))
    if s >= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                  Image.Resampling.LANCZOS))


def _crop(ph: Photo, human: bool, size: int) -> np.ndarray:
    y0, x0, s = face_square(ph.rgb, ph.face) if human and ph.face is not None else centre_square(ph.rgb)
    return np.asarray(Image.fromarray(ph.rgb[y0:y0 + s, x0:x0 + s]).resize((size, size), Image.Resampling.LANCZOS))


def plan_files(req: NewConceptRequest, category: str, train: list[Photo], test: list[Photo], text: ConceptText,
               random_keys: list[str], references: list[str]) -> dict[str, bytes]:
    """Path (relative to the data root) → bytes of every file of the concept itself (module docstring); the root's
    shared files are added by the caller."""
    c, tok = req.name, f"<{req.name}>"
    tr, te = f"concept/train/{c}", f"concept/test/{c}"
    train_keys = [f"{i}.png" for i in range(len(train))]
    test_keys = [f"{i}.png" for i in range(len(test))]
    files: dict[str, bytes] = {}
    for key, ph in zip(train_keys, train):
        files[f"{tr}/{key}"] = png_bytes(_fit(ph.rgb, req.max_side))
        files[f"{tr}/cropped/{key}"] = png_bytes(_crop(ph, category == "human", req.crop_size))
    for key, ph in zip(test_keys, test):
        files[f"{te}/{key}"] = png_bytes(_fit(ph.rgb, req.max_side))
    files[f"{tr}/info.json"] = json_bytes(info_record(req.class_word, category, text.info, text.extra_info,
                                                      explicit_category=True))
    files[f"{tr}/conversations.json"] = json_bytes({k: [{"query": q, "answer": a} for q, a in text.conversations[k]]
                                                    for k in train_keys})
    files[f"{tr}/captions.json"] = json_bytes({k: text.captions[k] for k in train_keys})
    pos, neg = recognition_records(tok, train_keys, random_keys)
    files[f"{tr}/positive_recognitions.json"] = json_bytes(pos)
    files[f"{tr}/random_recognitions.json"] = json_bytes(neg)
    files[f"{te}/t2i_conditions.json"] = json_bytes(t2i_conditions_record(text.reasoning))
    files[f"{te}/vqa.json"] = json_bytes({k: [{"query": q, "answer": a} for q, a in text.test_vqa[k]]
                                          for k in test_keys})
    files[f"{te}/text_only.json"] = json_bytes([{"query": q, "answer": a} for q, a in text.text_only])
    vqa = [(f"{te}/{k}", q, a) for k in test_keys for q, a in text.test_vqa[k]]
    files[f"test_data/{c}.json"] = json_bytes(test_data_items(tok, [f"{te}/{k}" for k in test_keys],
                                                              random_keys[:4], vqa, text.text_only))
    return files


def _write_tree(base: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _validate(files: dict[str, bytes], name: str, references: list[str], random_src: list[Path],
              text_task_ratio: float) -> None:
    """Write the plan to a scratch root and read it back as training and evaluation do; ConceptError otherwise."""
    from rl.data.reader import check_training_use, load_concept_dataset

    with tempfile.TemporaryDirectory(prefix="new_concept-check-") as tmp:
        root = Path(tmp)
        _write_tree(root, {k: v for k, v in files.items() if k.startswith(("concept/", "test_data/", "random_"))})
        (root / "random_images").mkdir(exist_ok=True)
        for p in random_src:
            if not (root / "random_images" / p.name).exists():
                shutil.copyfile(p, root / "random_images" / p.name)
        (root / BLACK_NAME).write_bytes(png_bytes(black_image()))
        (root / "concepts_list.json").write_bytes(json_bytes([name]))
        (root / "concept/train/train_images.json").write_bytes(json_bytes({name: references}))
        try:
            check_training_use(load_concept_dataset(root, include_test=True), text_task_ratio)
        except DatasetError as e:
            raise ConceptError(f"the written concept would not load: {str(e).replace(str(root), '<data-root>')}") from e


def _replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _commit(root: Path, name: str, files: dict[str, bytes]) -> None:
    """Stage the concept's folders in the root, swap them in, then replace the single files (list last)."""
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".new_concept-{name}-", dir=root))
    trash = stage / "old"
    try:
        _write_tree(stage / "new", {k: v for k, v in files.items() if k.startswith("concept/") and f"/{name}/" in k})
        for side in ("train", "test"):
            dest = root / "concept" / side / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                trash.mkdir(exist_ok=True)
                os.replace(dest, trash / side)
            os.replace(stage / "new" / "concept" / side / name, dest)
        singles = {k: v for k, v in files.items() if not (k.startswith("concept/") and f"/{name}/" in k)}
        for rel in sorted(singles, key=lambda k: k == "concepts_list.json"):
            if rel.startswith("random_images/") or rel == BLACK_NAME:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(singles[rel])
            else:
                _replace_file(root / rel, singles[rel])
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def build_new_concept(req: NewConceptRequest, writer=None, log: Callable[[str], None] = print,
                      face_detector=None) -> NewConceptResult:
    """Check, plan, validate and write the concept (module docstring). ``writer``: a
    :class:`rl.data.concept_vlm.VLMTextWriter`, or None for the offline templates. ConceptError (one line, nothing
    written) for anything that stops it."""
    from rl.data.concept_text import template_text

    try:
        name = check_concept_name(req.name, "--name")
    except DatasetError as e:
        raise ConceptError(str(e)) from e
    if not req.class_word or not req.class_word.strip() or len(req.class_word) > 40 or "<" in req.class_word:
        raise ConceptError(f"--class must be a plain class word such as 'dog' or 'mug', got {req.class_word!r}")
    cls = " ".join(req.class_word.split())
    root = Path(req.data_root).expanduser().resolve()
    names, new_root = _check_root(root, name, req.force)
    category = resolve_category(cls, req.category, log)
    try:
        facts = normalise_facts(name, req.facts, req.facts_source)
        profile = normalise_profile(name, cls, req.profile)
        report = check_photos(req.photos, req.limits, category, face_detector)
    except (TextError, PhotoError) as e:
        raise ConceptError(str(e)) from e
    for fname, why in report.refused.items():
        log(f"  refused {fname}: {why}")
    k = req.limits.test_photos
    train, test = report.usable[:len(report.usable) - k], report.usable[len(report.usable) - k:]
    log(f"photos: {len(report.usable)} usable of {len(report.usable) + len(report.refused)} files -> {len(train)} "
        f"training, {len(test)} test" + (f"; faces in {sum(p.face is not None for p in report.usable)}"
                                         if category == "human" else ""))
    train_keys = [f"{i}.png" for i in range(len(train))]
    brief = ConceptBrief(name, cls, category, profile, facts)
    try:
        if writer is None:
            text = template_text(brief, train_keys, [f"{i}.png" for i in range(len(test))])
        else:
            text = writer.write(brief, dict(zip(train_keys, (_fit(p.rgb, 1024) for p in train))),
                                {f"{i}.png": _fit(p.rgb, 1024) for i, p in enumerate(test)},
                                profile_given=bool(req.profile))
    except TextError as e:
        raise ConceptError(str(e)) from e
    references = [kk for kk, p in zip(train_keys, train) if category != "human" or p.face is not None]
    ratio = req.text_task_ratio if facts else 0.0
    files: dict[str, bytes] = {}
    if new_root:
        files[BLACK_NAME] = png_bytes(black_image())
        for i, im in enumerate(random_images(req.crop_size)):
            files[f"random_images/{i}.png"] = png_bytes(im)
        random_src: list[Path] = []
        random_keys = [kk for kk in files if kk.startswith("random_images/")]
    else:
        random_src = image_files(root / "random_images")
        random_keys = [f"random_images/{p.name}" for p in random_src]
    files.update(plan_files(req, category, train, test, text, random_keys, references))
    _validate(files, name, references, random_src, ratio)
    # the shared lists: train_images.json keeps every other concept's meaning (absent file: all training photos)
    ti = read_train_images(root) if not new_root else {}
    if ti is None:
        ti = {n: [p.name for p in image_files(root / "concept" / "train" / n)] for n in names if n != name}
    ti = {**{n: v for n, v in ti.items() if n != name}, name: references}
    files["concept/train/train_images.json"] = json_bytes(ti)
    files["concepts_list.json"] = json_bytes(names + ([name] if name not in names else []))
    _commit(root, name, files)
    written = sorted((rel, len(data)) for rel, data in files.items())
    log(f"wrote concept {name!r} ({category}, class {cls!r}, text from {text.source}) to {root}")
    return NewConceptResult(root=root, name=name, category=category, files=written, train_photos=len(train),
                            test_photos=len(test), references=references, text_source=text.source,
                            refused=dict(report.refused), facts=len(facts))
