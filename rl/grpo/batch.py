"""The rollout sample: the one record that crosses actor boundaries (rollout → controller → learner).

Only numpy arrays and plain Python values, so it pickles cheaply through the Ray object store. Shapes and
dtypes are fixed by `docs/contracts.md`; :func:`validate_sample` / :func:`validate_batch` check them and
name the offending field in the error.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable

import numpy as np

__all__ = ["RolloutSample", "validate_sample", "validate_batch", "sort_samples", "sample_key", "per_sample_attempts"]


@dataclass
class RolloutSample:
    """One screened, generated sample of a GRPO group (understanding answer + image trajectory)."""

    step: int
    """Training step that produced the sample."""
    prompt_index: int
    """Index of the prompt (group) within the step."""
    sample_index: int
    """Index of the sample within its group (0..G-1)."""
    concept: str
    """Concept name without brackets (e.g. "bo")."""
    category: str
    """Concept category from info.json: "human" | "animal" | "object" (D8)."""
    task_kind: str
    """Understanding task kind: "visual" | "text"."""
    mmu_input_ids: np.ndarray
    """int64 [Lm]: the understanding prompt sequence (unpadded)."""
    answer_ids: np.ndarray
    """int64 [M]: sampled answer tokens (unpadded, eot included if produced)."""
    answer_logps: np.ndarray
    """float32 [M]: rollout log-probs of answer_ids (D3)."""
    answer_text: str
    """Decoded answer (the IR before cleaning)."""
    prompt_text: str
    """The compound prompt CP the image was generated from."""
    prompt_cut: bool
    """True when IR was cut to fit the text budget (D9)."""
    t2i_input_ids: np.ndarray
    """int64 [L]: conditional t2i sequence, image slots = mask id."""
    uncond_input_ids: np.ndarray
    """int64 [L]: unconditional (CFG) t2i sequence."""
    states: np.ndarray
    """int64 [T, N]: image-block input ids before each MaskGIT step."""
    chosen: np.ndarray
    """int64 [T, N]: chosen code ids per step (all positions)."""
    image_logps: np.ndarray
    """float32 [T, N]: rollout log-probs of `chosen` (D4: the rollout–learner mismatch metric; with run.overlap:
    one_step also the PPO ratio's old log-probs)."""
    final_ids: np.ndarray
    """int64 [N]: final code ids."""
    image: np.ndarray
    """uint8 [H, W, 3]: decoded final image."""
    screen_score: float
    """DSOG screen score of the kept attempt (NaN when DSOG is off: the sample was not screened)."""
    attempts: int
    """Number of DSOG attempts drawn for this sample (>= 1)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Per-expert rewards (filled by the controller)."""
    reward: float = 0.0
    """Combined reward R (filled by the controller)."""
    advantage: float = 0.0
    """Dr.GRPO advantage R - mean(R_group) (filled by the controller)."""
    question: str = ""
    """The understanding question as the data writes it (visual) or the reasoning prompt IP (text), "<c>" kept."""
    reference: str = ""
    """The reference answer (visual) or the target extra_info item (text) the answer is rewarded against."""
    input_image: str = ""
    """File name of the understanding task's input image (a training photo, or the black placeholder)."""
    reward_text: str = ""
    """The text the screen and the reward experts scored the image against (``rl.grpo.tasks.reward_prompt``)."""
    attempt_scores: list[float] = field(default_factory=list)
    """DSOG screen score of every attempt drawn for this sample, in order (empty when DSOG is off)."""
    forced: bool = False
    """True when no attempt passed the DSOG threshold and the best-screened one was kept at the cap."""

    @property
    def key(self) -> tuple[int, int, int]:
        """(step, prompt_index, sample_index): the id the learner sorts by (D7)."""
        return sample_key(self)

    def validate(self) -> "RolloutSample":
        """Check shapes/dtypes (see :func:`validate_sample`); returns self for chaining."""
        validate_sample(self)
        return self


# field name -> (dtype, ndim)
_ARRAY_SPECS: dict[str, tuple[np.dtype, int]] = {
    "mmu_input_ids": (np.dtype(np.int64), 1),
    "answer_ids": (np.dtype(np.int64), 1),
    "answer_logps": (np.dtype(np.float32), 1),
    "t2i_input_ids": (np.dtype(np.int64), 1),
    "uncond_input_ids": (np.dtype(np.int64), 1),
    "states": (np.dtype(np.int64), 2),
    "chosen": (np.dtype(np.int64), 2),
    "image_logps": (np.dtype(np.float32), 2),
    "final_ids": (np.dtype(np.int64), 1),
    "image": (np.dtype(np.uint8), 3),
}
_KINDS = ("visual", "text")
_CATEGORIES = ("human", "animal", "object")


def _fail(name: str, msg: str, where: str) -> None:
    raise ValueError(f"RolloutSample{where}.{name}: {msg}")


def validate_sample(s: RolloutSample, where: str = "") -> None:
    """Raise ValueError naming the field if any array has the wrong type, dtype or shape.

    Checks: every array field is an ``np.ndarray`` with the contract dtype and rank; answer_ids /
    answer_logps have the same length; t2i / uncond sequences have the same length; states, chosen and
    image_logps share [T, N] and final_ids is [N]; image is [H, W, 3]; task_kind / category are known;
    attempts >= 1; scalars are finite where they must be.
    """
    if not isinstance(s, RolloutSample):
        raise ValueError(f"expected RolloutSample{where}, got {type(s).__name__}")
    for name, (dtype, ndim) in _ARRAY_SPECS.items():
        arr = getattr(s, name)
        if not isinstance(arr, np.ndarray):
            _fail(name, f"expected numpy.ndarray, got {type(arr).__name__}", where)
        if arr.dtype != dtype:
            _fail(name, f"expected dtype {dtype}, got {arr.dtype}", where)
        if arr.ndim != ndim:
            _fail(name, f"expected {ndim}-D array, got shape {tuple(arr.shape)}", where)
    if s.answer_ids.shape != s.answer_logps.shape:
        _fail("answer_logps", f"shape {s.answer_logps.shape} != answer_ids shape {s.answer_ids.shape}", where)
    if s.t2i_input_ids.shape != s.uncond_input_ids.shape:
        _fail("uncond_input_ids", f"shape {s.uncond_input_ids.shape} != t2i_input_ids shape "
              f"{s.t2i_input_ids.shape}", where)
    t, n = s.states.shape
    if t < 1 or n < 1:
        _fail("states", f"expected non-empty [T, N], got {s.states.shape}", where)
    for name in ("chosen", "image_logps"):
        if getattr(s, name).shape != (t, n):
            _fail(name, f"shape {getattr(s, name).shape} != states shape {(t, n)}", where)
    if s.final_ids.shape != (n,):
        _fail("final_ids", f"shape {s.final_ids.shape} != (N,) = {(n,)}", where)
    if s.image.shape[2] != 3 or s.image.shape[0] < 1 or s.image.shape[1] < 1:
        _fail("image", f"expected [H, W, 3], got {s.image.shape}", where)
    if s.task_kind not in _KINDS:
        _fail("task_kind", f"expected one of {_KINDS}, got {s.task_kind!r}", where)
    if s.category not in _CATEGORIES:
        _fail("category", f"expected one of {_CATEGORIES}, got {s.category!r}", where)
    for name in ("step", "prompt_index", "sample_index", "attempts"):
        v = getattr(s, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            _fail(name, f"expected a non-negative int, got {v!r}", where)
    if s.attempts < 1:
        _fail("attempts", f"expected >= 1, got {s.attempts}", where)
    for name in ("screen_score", "reward", "advantage"):
        v = getattr(s, name)
        if name == "screen_score" and isinstance(v, float) and np.isnan(v):
            continue  # not screened (DSOG off)
        if not isinstance(v, (float, int, np.floating, np.integer)) or not np.isfinite(v):
            _fail(name, f"expected a finite number, got {v!r}", where)
    if not isinstance(s.rewards, dict):
        _fail("rewards", f"expected dict[str, float], got {type(s.rewards).__name__}", where)
    for k, v in s.rewards.items():
        if not np.isfinite(v):
            _fail("rewards", f"reward {k!r} is not finite: {v!r}", where)


def validate_batch(samples: Iterable[RolloutSample]) -> list[RolloutSample]:
    """Validate every sample and check that all share T and N and that ids are unique.

    Returns the samples as a list. Errors name the sample position and field.
    """
    out = list(samples)
    if not out:
        raise ValueError("validate_batch: empty list of RolloutSample")
    seen: set[tuple[int, int, int]] = set()
    tn = None
    for i, s in enumerate(out):
        validate_sample(s, where=f"[{i}]")
        if tn is None:
            tn = s.states.shape
        elif s.states.shape != tn:
            raise ValueError(f"RolloutSample[{i}].states: shape {s.states.shape} differs from sample 0's {tn}")
        if s.key in seen:
            raise ValueError(f"RolloutSample[{i}]: duplicate id (step, prompt_index, sample_index) = {s.key}")
        seen.add(s.key)
    return out


def sample_key(s: RolloutSample) -> tuple[int, int, int]:
    """The sample id (step, prompt_index, sample_index)."""
    return (int(s.step), int(s.prompt_index), int(s.sample_index))


def sort_samples(samples: Iterable[RolloutSample]) -> list[RolloutSample]:
    """Samples in id order, the order the learner consumes them in (D7)."""
    return sorted(samples, key=sample_key)


def per_sample_attempts(scores: list[float], passed: list[bool], attempts: list[int]
                        ) -> list[tuple[list[float], bool]]:
    """Split a shard's attempt-major DSOG log into (screen scores, forced) per sample.

    ``scores`` / ``passed`` list every attempt round by round, each round's samples in increasing order (how
    :class:`rl.grpo.dsog.AttemptBatch` logs them); ``attempts`` is each sample's attempt count, so round ``r`` holds
    exactly the samples with more than ``r`` attempts. A sample is forced when none of its attempts passed. With an
    empty log (DSOG off) every sample gets ``([], False)``; a log that does not add up raises ValueError.
    """
    if not scores:
        return [([], False) for _ in attempts]
    if len(scores) != len(passed) or len(scores) != sum(attempts):
        raise ValueError(f"per_sample_attempts: {len(scores)} scores / {len(passed)} decisions for attempts "
                         f"{list(attempts)} (sum {sum(attempts)})")
    out: list[tuple[list[float], list[bool]]] = [([], []) for _ in attempts]
    k = 0
    for r in range(max(attempts, default=0)):
        for i, n in enumerate(attempts):
            if n > r:
                out[i][0].append(float(scores[k]))
                out[i][1].append(bool(passed[k]))
                k += 1
    return [(s, not any(p)) for s, p in out]


def field_names() -> list[str]:
    """All RolloutSample field names, in declaration order."""
    return [f.name for f in fields(RolloutSample)]
