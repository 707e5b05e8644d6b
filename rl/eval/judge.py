"""Pluggable judges for the judged UnifyBench++ metrics (Dense Rea., Dense Gen.); none by default, never required.

The paper scores these with GPT-4o. The service ships one judge, ``"openai"`` (:mod:`rl.eval.judge_openai`: any
OpenAI-compatible chat-completions endpoint, GPT-4o or a local VLM server, with the released judge prompts); others
can be registered. Without ``eval.judge`` the metrics are reported as "not computed". A judge is any object with the
:class:`Judge` methods (a judge that also has ``image_score(image, prompt, concept_info)`` scores each Dense Gen.
image as a whole against its prompt and the concept's profile, as the released 4o judge does):

* ``answer_score(question, answer, reference) -> float`` in [0, 1]: Dense Rea. (the model's reasoning answer
  against the correct fact);
* ``segment_scores(image, segments) -> list[float]`` in [0, 1]: Dense Gen. (for each punctuation segment of the
  prompt, whether the image shows it; the image's score is their mean).

Register with :func:`register_judge` (a factory taking keyword options) and build with :func:`build_judge`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

__all__ = ["Judge", "register_judge", "unregister_judge", "judge_names", "build_judge", "check_judge_score"]


@runtime_checkable
class Judge(Protocol):
    """What the evaluation needs from a judge."""

    name: str
    """Name shown in the results."""

    def answer_score(self, question: str, answer: str, reference: str) -> float:
        """How well ``answer`` gives the fact ``reference`` asked for by ``question``, in [0, 1]."""
        ...

    def segment_scores(self, image: np.ndarray, segments: list[str]) -> list[float]:
        """Per prompt segment, whether the uint8 [H, W, 3] ``image`` depicts it, each in [0, 1]."""
        ...


_REGISTRY: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str, factory: Callable[..., Judge], replace: bool = False) -> None:
    """Make ``build_judge(name, **options)`` call ``factory(**options)``. Re-registering needs ``replace``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"judge name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"judge {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def unregister_judge(name: str) -> None:
    """Remove a registered judge (no error if absent)."""
    _REGISTRY.pop(name, None)


def judge_names() -> list[str]:
    """Registered judge names."""
    return sorted(_REGISTRY)


def build_judge(name: str | None, **options: Any) -> Judge | None:
    """The judge registered as ``name`` (None / "" / "none" → None). Unknown names are a ValueError."""
    if name is None or name in ("", "none"):
        return None
    if name == "openai" and name not in _REGISTRY:   # built in, imported on first use
        from rl.eval.judge_openai import OpenAIJudge

        register_judge("openai", OpenAIJudge)
    if name not in _REGISTRY:
        raise ValueError(f"eval.judge: unknown judge {name!r}; registered: {judge_names() or 'none'} "
                         "(register one with rl.eval.judge.register_judge)")
    judge = _REGISTRY[name](**options)
    if not isinstance(judge, Judge):
        raise ValueError(f"judge {name!r}: factory returned {type(judge).__name__}, which lacks the Judge methods")
    return judge


def check_judge_score(value: Any, judge: str, what: str) -> float:
    """A judge's score as a float in [0, 1]; anything else is a ValueError naming the judge."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"judge {judge!r}: {what} returned {value!r}, not a number") from exc
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"judge {judge!r}: {what} returned {v}, outside [0, 1]")
    return v
