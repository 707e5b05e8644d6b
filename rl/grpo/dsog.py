"""DSOG: dynamic screening of MaskGIT samples with an adaptive threshold (design D6, paper §3.3.1).

A sample is generated up to ``screen_step``; its predicted grid is decoded and scored by the screening
expert. It continues only if ``score > threshold``; otherwise it is discarded and redrawn from step 0 (same
IR and prompt). At ``max_attempts`` the best-screened attempt is kept and counted as *forced*.

The attempt rule lives here once: :class:`AttemptLoop` decides for one sample, :class:`AttemptBatch` runs the loops
of a shard's samples round by round (the lock-step engine draws all pending samples to the screen step together,
scores their previews in one call, redraws the rejected ones as a smaller batch and resumes the kept ones
together); the continuous engine (actors/rollout/continuous.py) offers each sample's attempts to its own loop as
their screens come back, and logs them with :func:`attempt_major`. Ties at the cap keep the first best-screened attempt.

Threshold (paper Eq. 9 as fixed by D6). T₀ = the (1 − TPR) quantile of the first batch's screen scores, or
``initial_threshold``. In the rollout (:class:`AttemptBatch` with ``calibrate``) an uncalibrated shard computes T₀
from its first round's scores and judges that same round against it, so about TPR of the first attempts pass; a
bare :class:`AttemptLoop` / :meth:`DSOGController.observe_batch` without a threshold instead lets every first attempt
pass and only calibrates. Then after each batch with pass rate PR = passed attempts / attempts:

    P = T_prev^(1 + μ·(TPR − PR)),   m = η·m + (1 − η)·(P − T_prev),   T = T_prev + m

The power rule only makes sense for 0 < T < 1 (for T > 1 it moves the wrong way, for T ≤ 0 it is
undefined). **Decision:** by default (``space="normalized"``) the rule runs on u = (T − lo)/(hi − lo) ∈ (0, 1),
where [lo, hi] is the running min/max of all screen scores seen, widened by ``range_margin`` of its width on
each side; T is then kept inside that widened range. This makes the controller invariant to the scorer's
offset and scale (BLIP-2 cosines, CLIP mixes, scores ×100, negative scores all behave alike) and reduces to
the paper's rule on the unit interval. ``space="raw"`` applies the rule to T itself (the paper / released
code literally); a batch whose T_prev is outside (0, 1) then falls back to the normalized update and is
counted in ``fallbacks``. Caveat: one extreme outlier widens [lo, hi] for good and slows later steps.

``rule="step"`` is the released code's variant: compute the same proposal and move by ±``step_size`` (in the
rule's space) when the proposed change exceeds ``step_size``, else keep T.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from rl.grpo.config import DSOGConfig

__all__ = ["DSOGConfig", "DSOGController", "AttemptBatch", "AttemptLoop", "AttemptResult", "attempt_major",
           "select_attempt"]

_EPS_U = 1e-6


@dataclass
class AttemptResult:
    """Outcome of one sample's attempt loop."""

    kept_index: int
    """Index of the kept attempt (its paused state is resumed)."""
    forced: bool
    """True when no attempt passed and the best-screened one was kept at the cap."""
    scores: list[float] = field(default_factory=list)
    """Screen scores of the attempts, in order."""
    passed: list[bool] = field(default_factory=list)
    """Whether each attempt passed the threshold."""

    @property
    def attempts(self) -> int:
        """Number of attempts drawn."""
        return len(self.scores)

    @property
    def kept_score(self) -> float:
        """Screen score of the kept attempt."""
        return self.scores[self.kept_index]


def _check_score(score: Any) -> float:
    s = float(score)
    if not np.isfinite(s):
        raise ValueError(f"DSOG: screen score must be finite, got {score!r}")
    return s


class AttemptLoop:
    """Incremental attempt loop for one sample: ``offer(score)`` after each screened attempt.

    ``offer`` returns None while another attempt should be drawn, else the :class:`AttemptResult`. The
    loop always ends by ``max_attempts`` offers; offering after it ended raises. ``threshold=None``
    accepts the first attempt (the rollout never screens without a threshold: :class:`AttemptBatch` calibrates
    one from its first round first).
    """

    def __init__(self, threshold: float | None, max_attempts: int) -> None:
        if max_attempts < 1:
            raise ValueError(f"AttemptLoop: max_attempts must be >= 1, got {max_attempts}")
        self.threshold = threshold
        self.max_attempts = int(max_attempts)
        self.scores: list[float] = []
        self.passed: list[bool] = []
        self.result: AttemptResult | None = None

    def offer(self, score: float) -> AttemptResult | None:
        """Record an attempt's screen score; return the result when the loop is done, else None."""
        if self.result is not None:
            raise RuntimeError("AttemptLoop.offer: the loop already ended")
        s = _check_score(score)
        ok = self.threshold is None or s > self.threshold
        self.scores.append(s)
        self.passed.append(ok)
        if ok:
            self.result = AttemptResult(len(self.scores) - 1, False, list(self.scores), list(self.passed))
        elif len(self.scores) >= self.max_attempts:
            self.result = AttemptResult(self.best_index, True, list(self.scores), list(self.passed))
        return self.result

    @property
    def best_index(self) -> int | None:
        """The best-screened attempt so far (the first of ties; what a forced keep keeps), None before any."""
        return int(np.argmax(self.scores)) if self.scores else None

    @property
    def candidate(self) -> int | None:
        """The attempt this loop keeps (ended) or would keep at the cap now (running): its state must be held."""
        return self.result.kept_index if self.result is not None else self.best_index


class AttemptBatch:
    """The attempt loops of ``size`` samples drawn and screened together, round by round.

    Round ``r`` draws attempt ``r`` of every sample in :attr:`pending` (in increasing sample order) as one batch; its
    screen scores go to :meth:`offer` in that order. Each sample's decision is its own :class:`AttemptLoop`; samples
    whose attempt passed, or that reached ``max_attempts`` (forced keep of the best-screened attempt), leave
    :attr:`pending`, the rest are redrawn next round. :attr:`scores` / :attr:`passed` log every attempt
    attempt-major (round by round, samples in order).

    ``threshold=None`` with ``calibrate`` (a :class:`DSOGConfig`): the first round's scores set the threshold
    (:meth:`DSOGController.initial_threshold`, recorded in :attr:`init_threshold`) and that round is judged against
    it. ``threshold=None`` without ``calibrate`` lets every first attempt pass.
    """

    def __init__(self, size: int, threshold: float | None, max_attempts: int,
                 calibrate: DSOGConfig | None = None) -> None:
        if size < 1:
            raise ValueError(f"AttemptBatch: size must be >= 1, got {size}")
        if max_attempts < 1:
            raise ValueError(f"AttemptBatch: max_attempts must be >= 1, got {max_attempts}")
        self.size = int(size)
        self.max_attempts = int(max_attempts)
        self.threshold = threshold
        self.calibrate = calibrate
        self.init_threshold: float | None = None
        """The threshold this batch calibrated (only when it started without one and with ``calibrate``)."""
        self.loops: list[AttemptLoop] | None = None
        self.pending: list[int] = list(range(self.size))
        """Samples to draw in the next round, in increasing order."""
        self.members: list[list[int]] = []
        """The samples drawn in each round so far, in batch-row order."""
        self.scores: list[float] = []
        self.passed: list[bool] = []

    @property
    def round(self) -> int:
        """The next round's index = the attempt index its samples draw (their D7 attempt seed)."""
        return len(self.members)

    @property
    def done(self) -> bool:
        """True once every sample has a kept attempt."""
        return not self.pending

    def offer(self, scores: Any) -> list[int]:
        """Record one round's screen scores (one per :attr:`pending` sample, in order); returns the samples that
        ended this round."""
        if self.done:
            raise RuntimeError("AttemptBatch.offer: every sample already ended")
        s = np.asarray(scores).reshape(-1)
        if s.shape[0] != len(self.pending):
            raise ValueError(f"AttemptBatch.offer: {s.shape[0]} scores for {len(self.pending)} pending samples")
        if self.loops is None:
            if self.threshold is None and self.calibrate is not None:
                self.threshold = self.init_threshold = DSOGController.initial_threshold(scores, self.calibrate)
            self.loops = [AttemptLoop(self.threshold, self.max_attempts) for _ in range(self.size)]
        drawn, still, ended = list(self.pending), [], []
        for row, i in enumerate(drawn):
            loop = self.loops[i]
            res = loop.offer(s[row])
            self.scores.append(loop.scores[-1])
            self.passed.append(loop.passed[-1])
            (still if res is None else ended).append(i)
        self.members.append(drawn)
        self.pending = still
        return ended

    @property
    def results(self) -> list[AttemptResult]:
        """Every sample's :class:`AttemptResult`, in sample order (the batch must be done)."""
        if not self.done or self.loops is None:
            raise RuntimeError(f"AttemptBatch.results: {len(self.pending)} samples still pending")
        return [loop.result for loop in self.loops]  # type: ignore[misc]

    @property
    def forced(self) -> int:
        """Samples kept at the cap below the threshold (so far)."""
        return sum(1 for loop in self.loops or [] if loop.result is not None and loop.result.forced)

    def live_rounds(self) -> set[int]:
        """Rounds holding an attempt that is kept, or would be kept at the cap: their paused states must be held,
        every other round's may be dropped."""
        return {loop.candidate for loop in self.loops or [] if loop.candidate is not None}

    def resume_plan(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """The kept attempts grouped by the round that drew them: ``[(round, [(sample, row in that round), ...])]``.

        Order (it fixes the resume batches' composition, so it is part of the bit-exact contract): passed attempts
        by (round, sample), then forced keeps by sample; rounds in order of first appearance in that sequence."""
        results = self.results
        order = sorted((i for i, r in enumerate(results) if not r.forced), key=lambda i: (results[i].kept_index, i))
        order += [i for i, r in enumerate(results) if r.forced]
        plan: dict[int, list[tuple[int, int]]] = {}
        for i in order:
            r = results[i].kept_index
            plan.setdefault(r, []).append((i, self.members[r].index(i)))
        return list(plan.items())


def attempt_major(loops: list[AttemptLoop]) -> tuple[list[float], list[bool]]:
    """Every attempt's screen score and pass flag, attempt-major: attempt 0 of each sample in sample order, then
    attempt 1 of those that drew one, ... (the order :class:`AttemptBatch` logs its rounds in, whatever order the
    attempts were actually screened in)."""
    scores, passed = [], []
    for r in range(max((len(loop.scores) for loop in loops), default=0)):
        for loop in loops:
            if len(loop.scores) > r:
                scores.append(loop.scores[r])
                passed.append(loop.passed[r])
    return scores, passed


def select_attempt(scores: Iterable[float], threshold: float | None, max_attempts: int) -> AttemptResult:
    """Which attempt is kept given attempts' scores in order: the first passing one, else (at the cap)
    the best-screened one, counted as forced. Scores beyond the decision are ignored; too few scores to
    decide raise ValueError."""
    loop = AttemptLoop(threshold, max_attempts)
    for s in scores:
        res = loop.offer(s)
        if res is not None:
            return res
    raise ValueError(f"select_attempt: {len(loop.scores)} scores, none passed threshold {threshold}, "
                     f"and the cap is {max_attempts}: more attempts are needed")


class DSOGController:
    """The adaptive screen threshold and its metrics. Lives in the controller; workers get ``threshold``."""

    def __init__(self, cfg: DSOGConfig | None = None) -> None:
        self.cfg = cfg or DSOGConfig()
        self.threshold: float | None = (None if self.cfg.initial_threshold is None
                                        else float(self.cfg.initial_threshold))
        self.velocity = 0.0
        self.lo: float | None = None
        self.hi: float | None = None
        self.batches = 0
        self.fallbacks = 0
        self.total_attempts = 0
        self.total_kept = 0
        self.total_forced = 0
        self._last: dict[str, float] = {}

    # ---------------------------------------------------------------- calibration
    @staticmethod
    def initial_threshold(scores: Any, cfg: DSOGConfig) -> float:
        """T₀ for a first batch: ``cfg.initial_threshold`` if set, else the (1 − TPR) quantile of ``scores``."""
        if cfg.initial_threshold is not None:
            return float(cfg.initial_threshold)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.size == 0 or not np.isfinite(s).all():
            raise ValueError("DSOGController.initial_threshold: need non-empty finite scores")
        return float(np.quantile(s, 1.0 - cfg.target_pass_rate))

    @property
    def initialized(self) -> bool:
        """True once a threshold exists (fixed start, :meth:`initialize`, or the first observed batch)."""
        return self.threshold is not None

    def initialize(self, threshold: float) -> None:
        """Set T₀ explicitly (e.g. computed by a worker from the first group's scores)."""
        t = _check_score(threshold)
        self.threshold = t

    # ---------------------------------------------------------------- decisions
    @property
    def active_threshold(self) -> float | None:
        """Threshold to screen with, None = accept everything (disabled or not yet calibrated)."""
        return self.threshold if self.cfg.enabled else None

    def decide(self, score: float) -> bool:
        """True if an attempt with this screen score passes (always True while uncalibrated/disabled)."""
        s = _check_score(score)
        t = self.active_threshold
        return t is None or s > t

    def attempt_loop(self) -> AttemptLoop:
        """A fresh :class:`AttemptLoop` at the current threshold (1 attempt when DSOG is disabled)."""
        return AttemptLoop(self.active_threshold, self.cfg.max_attempts if self.cfg.enabled else 1)

    def select_attempt(self, scores: Iterable[float]) -> AttemptResult:
        """:func:`select_attempt` at the current threshold and cap."""
        return select_attempt(scores, self.active_threshold, self.cfg.max_attempts)

    # ---------------------------------------------------------------- updates
    def observe_results(self, results: Iterable[AttemptResult]) -> dict[str, float]:
        """Update from the attempt loops of one batch (see :meth:`observe_batch`)."""
        results = list(results)
        scores = [s for r in results for s in r.scores]
        passed = [p for r in results for p in r.passed]
        return self.observe_batch(scores, passed, forced=sum(int(r.forced) for r in results))

    def observe_batch(self, scores: Any, passed: Any, forced: int = 0) -> dict[str, float]:
        """Update the threshold from one batch: all attempts' screen scores, whether each passed, and the
        number of forced keeps. The first batch only calibrates (quantile); later ones apply the rule.
        Returns this batch's metrics."""
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        p = np.asarray(passed, dtype=bool).reshape(-1)
        if s.size == 0 or s.shape != p.shape:
            raise ValueError(f"DSOGController.observe_batch: need equal-length non-empty scores and passed, "
                             f"got {s.shape} and {p.shape}")
        if not np.isfinite(s).all():
            raise ValueError("DSOGController.observe_batch: scores contain NaN/inf")
        if forced < 0 or forced > s.size:
            raise ValueError(f"DSOGController.observe_batch: forced={forced} out of range")
        self.lo = float(s.min()) if self.lo is None else min(self.lo, float(s.min()))
        self.hi = float(s.max()) if self.hi is None else max(self.hi, float(s.max()))
        pass_rate = float(p.mean())
        if self.cfg.enabled:
            if self.threshold is None:
                self.threshold = self.initial_threshold(s, self.cfg)
            else:
                self._update(pass_rate)
        kept = int(p.sum()) + int(forced)
        self.batches += 1
        self.total_attempts += int(s.size)
        self.total_kept += kept
        self.total_forced += int(forced)
        self._last = {"pass_rate": pass_rate, "attempts": float(s.size), "kept": float(kept),
                      "attempts_per_kept": float(s.size) / max(kept, 1), "forced_keeps": float(forced),
                      "score_mean": float(s.mean())}
        return self.metrics()

    def _frame(self, t: float) -> tuple[float, float, bool]:
        """(offset, scale, normalized) mapping the rule's coordinate u to scores: score = offset + scale·u."""
        if self.cfg.space == "raw" and 0.0 < t < 1.0:
            return 0.0, 1.0, False
        if self.cfg.space == "raw":
            self.fallbacks += 1
        assert self.lo is not None and self.hi is not None
        width = max(self.hi - self.lo, 1e-6 * max(1.0, abs(self.lo), abs(self.hi)))
        return self.lo - self.cfg.range_margin * width, width * (1.0 + 2.0 * self.cfg.range_margin), True

    def _update(self, pass_rate: float) -> None:
        c = self.cfg
        t = float(self.threshold)
        offset, scale, normalized = self._frame(t)
        u = float(np.clip((t - offset) / scale, _EPS_U, 1.0 - _EPS_U))
        pu = u ** (1.0 + c.mu * (c.target_pass_rate - pass_rate))
        if c.rule == "momentum":
            self.velocity = c.momentum * self.velocity + (1.0 - c.momentum) * scale * (pu - u)
            t = t + self.velocity
        else:
            du = pu - u
            if du > c.step_size:
                t = t + c.step_size * scale
            elif du < -c.step_size:
                t = t - c.step_size * scale
        if normalized:
            t = float(np.clip(t, offset, offset + scale))
        self.threshold = t

    # ---------------------------------------------------------------- reporting / checkpoints
    def metrics(self) -> dict[str, float]:
        """Last batch's pass rate / attempts / forced keeps, the threshold and running totals."""
        out = dict(self._last)
        out.update({"threshold": float("nan") if self.threshold is None else float(self.threshold),
                    "velocity": self.velocity, "batches": float(self.batches),
                    "fallbacks": float(self.fallbacks), "total_forced": float(self.total_forced),
                    "total_attempts_per_kept": self.total_attempts / max(self.total_kept, 1)})
        return out

    _STATE_KEYS = ("threshold", "velocity", "lo", "hi", "batches", "fallbacks", "total_attempts",
                   "total_kept", "total_forced")

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state for checkpoints (config not included)."""
        return {"version": 1, **{k: getattr(self, k) for k in self._STATE_KEYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a missing key raises ValueError naming it."""
        for k in ("version",) + self._STATE_KEYS:
            if k not in state:
                raise ValueError(f"DSOGController.load_state_dict: missing key {k!r}")
        if state["version"] != 1:
            raise ValueError(f"DSOGController.load_state_dict: unknown version {state['version']!r}")
        for k in self._STATE_KEYS:
            setattr(self, k, state[k])
