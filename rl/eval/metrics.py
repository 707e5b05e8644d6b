"""UnifyBench++ metrics as pure functions (no model, no I/O): recognition, BLEU, CLIP-I/T from features,
aggregation over concepts, and the Markdown table.

* **Rec. (Weight)**: an answer counts as "yes" / "no" by its first whole word ``yes`` / ``no``
  (case-insensitive; neither = wrong). ``weighted = 0.5 · acc(positives) + 0.5 · acc(negatives)``: positives
  and negatives count equally however many there are of each (Yo'LLaVA / UniCTokens' weighted accuracy,
  i.e. every positive has weight ``0.5 / n_pos`` and every negative ``0.5 / n_neg``). With only one side present
  the weighted accuracy is that side's accuracy.
* **VQA / QA / Rea.**: character-level sentence BLEU with weights (0.7, 0.3) and method-1 smoothing
  (``rewards.bleu.char_bleu``, equal to nltk's ``sentence_bleu([list(ref)], list(hyp), (0.7, 0.3), method1)``).
* **CLIP-I**: per generated image, the mean cosine of its L2-normalised CLIP feature to the reference images'
  features; **CLIP-T**: cosine of image and text features (not ×100). Concept value = mean over images.
* Judged metrics (Dense Rea., Dense Gen.) are scores in [0, 1] from a :mod:`rl.eval.judge` judge, else ``None``.

A metric that could not be computed is ``None`` (never NaN) in every result dict.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

from rewards.bleu import char_bleu

__all__ = ["BLEU_WEIGHTS", "bleu", "parse_yes_no", "recognition_correct", "weighted_accuracy", "cosine_rows",
           "clip_i_from_features", "clip_t_from_features", "mean_or_none", "segment_prompt", "METRICS",
           "JUDGED", "aggregate", "markdown_table", "format_value"]

BLEU_WEIGHTS = (0.7, 0.3)
"""UniCTokens' character-BLEU weights (1-gram, 2-gram)."""

METRICS: tuple[tuple[str, str], ...] = (
    ("rec", "Rec. (Weight)"),
    ("rea", "Rea. (BLEU)"),
    ("dense_rea", "Dense Rea. (judge)"),
    ("vqa", "VQA (BLEU)"),
    ("qa", "QA (BLEU)"),
    ("pure_gen_clip_t", "Pure Gen. CLIP-T"),
    ("pure_gen_clip_i", "Pure Gen. CLIP-I"),
    ("dense_gen", "Dense Gen. (judge)"),
    ("rea_gen_clip_t", "Rea. Gen. CLIP-T"),
    ("rea_gen_clip_i", "Rea. Gen. CLIP-I"),
    ("iaa", "IAA (UniPercept)"),
    ("iqa", "IQA (UniPercept)"),
    ("ista", "ISTA (UniPercept)"),
    ("face", "Face sim."),
)
"""(key, column title) of every headline metric, in table order (the paper's Table 1 order, plus UniPercept's
perceptual scores when serve.enabled includes unipercept, plus face)."""

JUDGED = ("dense_rea", "dense_gen")
"""Metrics that need a judge (shown as "not computed" without one)."""

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def bleu(reference: str, hypothesis: str) -> float:
    """Character-level BLEU (0.7, 0.3), method-1 smoothing, of ``hypothesis`` against ``reference``."""
    return float(char_bleu(reference, hypothesis, BLEU_WEIGHTS))


def parse_yes_no(answer: str) -> bool | None:
    """True for "yes", False for "no" (the first whole word of either, case-insensitive), None for neither."""
    m = _YES_NO.search(answer or "")
    return None if m is None else m.group(1).lower() == "yes"


def recognition_correct(answer: str, expected_yes: bool) -> bool:
    """Whether a recognition answer says what is expected (an answer with neither yes nor no is wrong)."""
    said = parse_yes_no(answer)
    return said is not None and said == bool(expected_yes)


def weighted_accuracy(positives: Sequence[bool], negatives: Sequence[bool]) -> dict[str, float | int | None]:
    """``weighted = 0.5·acc_pos + 0.5·acc_neg`` (one side only: that side's accuracy; none: None), plus
    ``pos_acc``, ``neg_acc``, plain ``acc`` over all answers, and the counts."""
    pos = [bool(x) for x in positives]
    neg = [bool(x) for x in negatives]
    pos_acc = sum(pos) / len(pos) if pos else None
    neg_acc = sum(neg) / len(neg) if neg else None
    sides = [a for a in (pos_acc, neg_acc) if a is not None]
    return {"weighted": sum(sides) / len(sides) if sides else None, "pos_acc": pos_acc, "neg_acc": neg_acc,
            "acc": (sum(pos) + sum(neg)) / (len(pos) + len(neg)) if pos or neg else None,
            "n_pos": len(pos), "n_neg": len(neg)}


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix ``[len(a), len(b)]`` of two feature arrays (normalised here)."""
    return _normalise(a) @ _normalise(b).T


def clip_i_from_features(generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """CLIP-I per generated image: mean over the reference images of the cosine, ``[N]``."""
    return cosine_rows(generated, references).mean(axis=1)


def clip_t_from_features(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """CLIP-T per (image, text) pair (row i with row i): cosine, ``[N]``."""
    return (_normalise(images) * _normalise(texts)).sum(axis=-1)


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the finite, non-None values; None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return math.fsum(vals) / len(vals) if vals else None


def segment_prompt(prompt: str) -> list[str]:
    """A dense prompt cut at punctuation (, ; . ! ? :) into its non-empty segments (the paper's Dense metrics)."""
    return [s.strip() for s in re.split(r"[,;.!?:]", prompt) if s.strip()]


def aggregate(per_concept: dict[str, dict]) -> dict[str, float | None]:
    """Mean of each headline metric over the concepts where it was computed (face: human concepts only)."""
    return {key: mean_or_none(m.get(key) for m in per_concept.values()) for key, _ in METRICS}


def format_value(value: float | None, key: str = "", judge: bool = False, applicable: bool = True) -> str:
    """A table cell: 3 decimals; judged metrics without a judge read "not computed"; "n/a" where the metric does
    not apply (face for non-human concepts); "—" where it applied but had no data."""
    if value is not None:
        return f"{value:.3f}"
    if key in JUDGED and not judge:
        return "not computed"
    return "n/a" if not applicable else "—"


def markdown_table(per_concept: dict[str, dict], mean: dict[str, float | None], judge: str | None = None,
                   categories: dict[str, str] | None = None) -> str:
    """The evaluation table: one row per concept, then the mean row; columns = :data:`METRICS`."""
    categories = categories or {}
    head = "| concept | " + " | ".join(title for _, title in METRICS) + " |"
    sep = "|---|" + "---|" * len(METRICS)
    lines = [head, sep]
    for name, m in per_concept.items():
        human = categories.get(name, "human") == "human"
        cells = [format_value(m.get(k), k, judge is not None, applicable=(k != "face" or human)) for k, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [format_value(mean.get(k), k, judge is not None) for k, _ in METRICS]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    note = (f"Judged metrics by judge {judge!r}." if judge else
            "Judged metrics (Dense Rea., Dense Gen.) are not computed: no judge configured (eval.judge).")
    return "\n".join(lines) + "\n\n" + note + "\n"
