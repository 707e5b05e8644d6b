"""What the UnifyBench++ evaluation asks, read as the released evaluation reads it (no model calls here).

* Understanding items (Rec., VQA, QA, choice): ``test_data/<c>.json`` (``gen_test_data.py``'s output, read by
  ``eval/eval_p_mmu.py``) when present; otherwise the concept's test photos (Rec. positives), the other concepts'
  test photos and ``random_images/`` (negatives), ``test/<c>/vqa.json`` and ``text_only.json``.
* Questions carry the system prompt of the prompt style: released = eval_p_mmu.py's ``"<c> is <token_0..15>"``
  (+ stage-3 tokens and ``".\\n"``) glued to the question; SFT = ``"<c> is <token_0..15>. "``.
* Pure Gen. (DreamBench): exactly ``prompts_to_eval.json[generation_type]`` with ``<sks>`` → ``<c>``, the released
  list kept beside the released code, so its path is a config field (``eval.prompts_to_eval``). A missing file is a
  loud warning naming the count of prompts used (or an error when the path was given explicitly).
* Rea. / Rea. Gen.: the held-out half of ``t2i_conditions.json`` (:attr:`rl.data.reader.ConceptTest.held_out`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.data.files import read_json
from rl.data.reader import ConceptDataset, DatasetError, ImageRef, ReasoningPrompt

log = logging.getLogger(__name__)

__all__ = ["MMUItem", "PHOTO_PROMPT", "read_prompts_to_eval", "resolve_prompts_to_eval", "pure_gen_prompts",
           "rec_items", "understanding_items", "test_reasoning", "system_question", "cap"]

PHOTO_PROMPT = "A photo of <c>."
"""The released face evaluation's prompt (eval/face_eval_v2.py), with "<c>" the concept token."""


@dataclass
class MMUItem:
    """One understanding question of the evaluation."""

    kind: str
    """"rec" | "vqa" | "qa" | "choice"."""
    image: ImageRef | Path
    """The image input (a test photo, a negative, or the black placeholder)."""
    question: str
    """The question without the system prompt, "<c>" as written in the data."""
    reference: str
    """Reference answer (rec: "Yes." / "No.")."""

    @property
    def expected_yes(self) -> bool:
        """Rec.: whether the reference answer is a yes."""
        return self.reference.strip().lower().startswith("yes")


def system_question(question: str, tokens: Any, style: str) -> str:
    """``question`` behind the style's system prompt (module docstring)."""
    if style == "released":
        return tokens.released_system_prompt() + question
    return f"{tokens.mmu_prefix()} {question}"


# ------------------------------------------------------------------------------------------ Pure Gen.
def read_prompts_to_eval(path: Path) -> dict[str, list[str]]:
    """The released ``prompts_to_eval.json``: {"object" | "live_subject": ["a <sks> ...", ...]}."""
    raw = read_json(path)
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v)
                                            for v in raw.values()):
        raise DatasetError(f"{path}: expected an object of prompt lists, e.g. {{\"object\": [\"a <sks> in the "
                           "jungle\", ...]}")
    return {k: [x.strip() for x in v] for k, v in raw.items()}


def resolve_prompts_to_eval(path: str | None, data_root: str | Path) -> tuple[dict[str, list[str]], str]:
    """(DreamBench prompts by generation_type, where they came from). ``path`` None: ``<data_root>/
    prompts_to_eval.json`` if present, else {} with a warning; a given path that does not exist is an error."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetError(f"eval.prompts_to_eval: {p} does not exist (the released prompts_to_eval.json, kept "
                               "beside the released code)")
        return read_prompts_to_eval(p), str(p)
    p = Path(data_root) / "prompts_to_eval.json"
    if p.is_file():
        return read_prompts_to_eval(p), str(p)
    log.warning("Pure Gen.: no prompts_to_eval.json (eval.prompts_to_eval is unset and %s does not exist): every "
                "concept's Pure Gen. uses 1 prompt (%r) instead of the released DreamBench list; set "
                "eval.prompts_to_eval to the released file", p, PHOTO_PROMPT)
    return {}, "missing"


def pure_gen_prompts(info: Any, dreambench: dict[str, list[str]]) -> list[str]:
    """Pure Gen. prompts of a concept: exactly the DreamBench list of its ``generation_type`` with ``<sks>`` →
    ``<c>`` (nothing mixed in); ``"A photo of <c>."`` alone only when no list is available (logged)."""
    if info.generation_type in dreambench:
        return [p.replace("<sks>", info.token) for p in dreambench[info.generation_type]]
    if dreambench:
        log.warning("Pure Gen.: prompts_to_eval has no %r list (keys %s); concept %s uses 1 prompt",
                    info.generation_type, sorted(dreambench), info.name)
    return [PHOTO_PROMPT.replace("<c>", info.token)]


# ------------------------------------------------------------------------------------------ understanding
def rec_items(dataset: ConceptDataset, concept: str) -> list[tuple[Any, bool]]:
    """(ImageRef, expected yes) pairs: the concept's test images, then negatives interleaved by source (each other
    concept's test images, random_images)."""
    pos = [(r, True) for r in dataset.concept(concept).test.images]
    sources = [list(c.test.images) for n, c in dataset.concepts.items() if n != concept and c.test is not None]
    sources.append(list(dataset.random_images))
    neg = []
    for k in range(max((len(s) for s in sources), default=0)):
        neg += [(s[k], False) for s in sources if k < len(s)]
    return pos + neg


def cap(items: list, *caps: int | None) -> list:
    """``items`` cut to the smallest of the given caps (None = no cap)."""
    caps = [c for c in caps if c is not None]
    return items[:min(caps)] if caps else items


def understanding_items(dataset: ConceptDataset, concept: str, ecfg: Any, limit: int | None = None
                        ) -> list[MMUItem]:
    """The concept's Rec. / VQA / QA / choice questions (module docstring), capped by ``ecfg.max_*`` and ``limit``."""
    c = dataset.concept(concept)
    test, token = c.test, c.info.token
    if test is None:
        raise DatasetError(f"concept {concept!r} has no test data: load the dataset with include_test=True")
    if test.items is not None:
        kinds = {"rec": "rec", "vqa": "vqa", "text_only": "qa"}
        items = [MMUItem(kinds.get(it.type, "choice"), it.image, it.question, it.answer) for it in test.items]
        pos = [x for x in items if x.kind == "rec" and x.expected_yes]
        neg = [x for x in items if x.kind == "rec" and not x.expected_yes]
        rest = {k: [x for x in items if x.kind == k] for k in ("vqa", "qa", "choice")}
    else:
        rec_q = ecfg.rec_question.replace("<c>", token)
        rec = rec_items(dataset, concept)
        pos = [MMUItem("rec", r, rec_q, "Yes.") for r, y in rec if y]
        neg = [MMUItem("rec", r, rec_q, "No.") for r, y in rec if not y]
        by_name = {r.name: r for r in test.images}
        for qa in test.vqa:
            if qa.image not in by_name:
                raise DatasetError(f"{dataset.root}/concept/test/{concept}/vqa.json: image {qa.image!r} is not a "
                                   "test image")
        rest = {"vqa": [MMUItem("vqa", by_name[qa.image], qa.query, qa.answer) for qa in test.vqa],
                "qa": [MMUItem("qa", dataset.black_image, qa.query, qa.answer) for qa in test.text_only],
                "choice": []}
    return (cap(pos, ecfg.max_rec_positive, limit) + cap(neg, ecfg.max_rec_negative, limit)
            + cap(rest["vqa"], ecfg.max_vqa, limit) + cap(rest["qa"], ecfg.max_qa, limit)
            + cap(rest["choice"], ecfg.max_qa, limit))


def test_reasoning(dataset: ConceptDataset, concept: str) -> list[ReasoningPrompt]:
    """Held-out reasoning prompts with their answer index (Rea., Rea. Gen.)."""
    c = dataset.concept(concept)
    if c.test is None:
        raise DatasetError(f"concept {concept!r} has no test data: load the dataset with include_test=True")
    if c.test.unpaired:
        log.info("concept %s: %d held-out personalized-driven prompt(s) have no extra_info item and are not "
                 "scored", concept, len(c.test.unpaired))
    return list(c.test.held_out)
