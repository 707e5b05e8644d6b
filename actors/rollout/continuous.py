"""Continuous MaskGIT batching with asynchronous DSOG screening and rewards (``rollout.engine: continuous``).

One loop thread per rollout actor owns the policy and keeps a *running batch* of up to ``rollout.max_batch``
samples, each at its own MaskGIT step with its own τ and generator (D7 seeds, as in the lock-step engine); one
:meth:`backbone.maskgit.MaskGITSampler.step_many` forward advances them all. Around it:

* **admission**: a queued shard (a :class:`~actors.rollout.engine.SampleRequest` from the driver; the driver keeps
  several in flight per actor and they queue here) is admitted when the running batch has room: its answers are
  generated (:meth:`RolloutEngine.prepare`) and its samples' first attempts join the batch as one *cohort*;
* **screening**: a sample reaching ``dsog.screen_step`` leaves the batch (*parks*) while the others keep stepping;
  the previews of a shard's samples that parked at the same step are decoded together and scored in one call on
  a background thread. Each sample's decision is its own :class:`rl.grpo.dsog.AttemptLoop` (the one DSOG rule): a
  pass resumes the parked sample in the running batch, a fail redraws it (attempt + 1; one call's redraws form one
  cohort, joining the batch at once), at the cap the best-screened parked attempt resumes (forced keep). A shard
  without a threshold (the first step) waits for all its first attempts and calibrates T₀ from them
  (:meth:`DSOGController.initial_threshold`), then judges them, exactly as the lock-step engine does;
* **rewards**: a shard whose samples all finished is decoded and scored in the background and its result returned.

Calls are per shard and run concurrently (at most ``rollout.max_inflight_calls`` at once); the reward servers' own
dynamic batching (``serve.<expert>.max_batch_size``) merges concurrent calls, as it merges different actors'. The
loop waits on a call only when it has nothing to step.

**What stays bit-identical.** A cohort joins the running batch whole, so a shard's previews, images, screen and
reward calls are grouped exactly as in lock-step (per shard and round); only the MaskGIT forward's batch changes.
On CPU with one torch thread that forward's rows do not depend on the batch, so samples, rewards and DSOG
bookkeeping are bit-identical to ``rollout.engine: lockstep`` for any ``max_batch`` and any mix of shards (tested,
tests/test_continuous.py). On a GPU another batch shape may select another GEMM kernel: log-probs then agree to
the dtype's rounding (bf16 ~1e-2 relative) and a token drawn at a near-tie may differ; ``lockstep`` is the
deterministic mode for bit-exact comparisons.

Bookkeeping keeps its meaning: a shard's ``attempt_scores`` are attempt-major (:func:`rl.grpo.dsog.attempt_major`),
forced keeps and the calibrated threshold as in lock-step; ``timings``: ``answer`` (its own), ``image`` (its share of
each step's seconds), ``screen`` / ``reward`` (seconds its calls took, in the background), ``busy`` / ``held`` (the
actor's generating seconds out of the seconds it held work, since its previous result); ``reward_failures`` are
the backend's failures since the previous result (each counted once).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.rollout.engine import PreparedShard, RolloutEngine, SampleRequest, SampleResult
from rl.grpo.dsog import AttemptLoop, DSOGController, attempt_major

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    """One attempt of one sample: a single-sample sampler state in (or parked out of) the running batch."""

    job: "_Job"
    pos: int
    """Position of the sample in its shard (``job.prep.idx[pos]`` is its D7 sample index)."""
    attempt: int
    state: object
    screened: bool = False


@dataclass(eq=False)
class _Job:
    """An admitted shard."""

    prep: PreparedShard
    future: Future
    loops: list[AttemptLoop] | None = None
    """Per-sample attempt loops (None while the shard waits to calibrate its threshold)."""
    first: dict[int, tuple[float, _Row]] = field(default_factory=dict)
    """Uncalibrated / screen-only shards: attempt 0's screen score and row per position, until all are in."""
    parked: dict[tuple[int, int], _Row] = field(default_factory=dict)
    """(position, attempt) → screened rows that a loop keeps or may still keep at the cap."""
    finished: dict[int, _Row] = field(default_factory=dict)
    """position → the kept attempt's row once it ran all steps."""
    failed: bool = False

    @property
    def size(self) -> int:
        return len(self.prep.idx)

    def add_time(self, key: str, seconds: float) -> None:
        t = self.prep.result.timings
        t[key] = t.get(key, 0.0) + seconds


def _by_job(rows: list[_Row]) -> list[list[_Row]]:
    """``rows`` split per shard (shards in first-appearance order, rows in their order)."""
    out: dict[int, list[_Row]] = {}
    for r in rows:
        out.setdefault(id(r.job), []).append(r)
    return list(out.values())


class ContinuousEngine:
    """Serves :meth:`generate_samples` calls from any thread through one continuous-batching loop over ``engine``'s
    policy and scorer (see the module docstring). ``engine.generate_samples`` stays the lock-step path."""

    def __init__(self, engine: RolloutEngine, max_batch: int, max_inflight_calls: int):
        if max_batch < 1 or max_inflight_calls < 1:
            raise ValueError(f"ContinuousEngine: max_batch and max_inflight_calls must be >= 1, got {max_batch}, "
                             f"{max_inflight_calls}")
        self.engine = engine
        self.sampler = engine.sampler
        self.dsog = engine.cfg.dsog
        self.max_batch = int(max_batch)
        self._incoming: deque[tuple[SampleRequest, Future]] = deque()
        self._cond = threading.Condition()
        self._calls = ThreadPoolExecutor(max_workers=int(max_inflight_calls), thread_name_prefix="rollout-call")
        self._inflight: dict[Future, tuple] = {}
        self._jobs: list[_Job] = []
        self._ready: deque[list[_Row]] = deque()
        """Cohorts waiting for room in the running batch: the rows started together (a shard's first attempts, the
        redraws one screen call rejected) or one resumed kept attempt; a cohort joins the batch whole."""
        self._running: list[_Row] = []
        self._busy = 0.0
        self._held = 0.0
        self._held_since: float | None = None
        self._failures_seen = dict(engine._failure_totals())
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="continuous-rollout", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------------------------------
    def submit(self, req: SampleRequest) -> Future:
        """Queue a shard; the future gets its :class:`SampleResult` (or the error that stopped it)."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("ContinuousEngine is closed")
            self._incoming.append((req, fut))
            self._cond.notify()
        return fut

    def generate_samples(self, req: SampleRequest) -> SampleResult:
        """The shard's result (blocks the calling thread; other calls' shards share the running batch)."""
        return self.submit(req).result()

    def close(self) -> None:
        """Stop the loop (queued and running shards fail) and the call threads."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self._calls.shutdown(wait=False, cancel_futures=True)

    # -- the loop --------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._incoming and not self._jobs:
                        self._clock_hold(False)
                        self._cond.wait()
                    if self._closed:
                        break
                self._clock_hold(True)
                self._collect(block=False)
                self._admit()
                self._fill()
                if self._running:
                    self._step()
                elif self._inflight:
                    self._collect(block=True)
                elif self._jobs and not self._ready:
                    raise RuntimeError("continuous engine: admitted shards with nothing to step and no call in "
                                       "flight")
        except BaseException as exc:   # noqa: BLE001 - every waiting caller gets the error
            log.exception("continuous rollout loop failed")
            self._fail_all(exc)
            return
        self._fail_all(RuntimeError("ContinuousEngine closed"))

    def _clock_hold(self, holding: bool) -> None:
        now = time.perf_counter()
        if holding and self._held_since is None:
            self._held_since = now
        elif not holding and self._held_since is not None:
            self._held += now - self._held_since
            self._held_since = None

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self._closed = True
            pending = [f for _, f in self._incoming] + [j.future for j in self._jobs]
            self._incoming.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)

    def _rows_held(self) -> int:
        return len(self._running) + sum(len(c) for c in self._ready)

    def _admit(self) -> None:
        """Admit queued shards while the running batch has room for their first attempts (a bad request fails its
        own caller only)."""
        taken, rows = [], self._rows_held()
        while rows < self.max_batch:
            with self._cond:
                if not self._incoming:
                    break
                req, fut = self._incoming.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            taken.append((req, fut))
            rows += len(req.samples)
        if not taken:
            return
        for req, fut in taken:
            t0 = time.perf_counter()
            try:
                prep = self.engine.prepare(req)
            except Exception as exc:   # a bad request fails its own caller only
                fut.set_exception(exc)
                continue
            job = _Job(prep=prep, future=fut)
            if req.threshold is not None and not req.screen_only and self.dsog.enabled:
                job.loops = [AttemptLoop(req.threshold, self.dsog.max_attempts) for _ in range(job.size)]
            self._jobs.append(job)
            self._ready.append(self._start(job, [(p, 0) for p in range(job.size)]))
            dt = time.perf_counter() - t0
            self._busy += dt
            job.add_time("answer", dt)

    @torch.no_grad()
    def _start(self, job: _Job, attempts: list[tuple[int, int]]) -> list[_Row]:
        """Fresh single-sample states for (position, attempt) pairs of one shard (one prefix forward for all)."""
        eng, req = self.engine, job.prep.req
        t2i = eng._t2i([job.prep.prompts[p] for p, _ in attempts])
        gens = [eng._gen(req, job.prep.idx[p], a, "image") for p, a in attempts]
        state = self.sampler.start(t2i, gens)
        if len(attempts) == 1:
            return [_Row(job, attempts[0][0], attempts[0][1], state)]
        return [_Row(job, p, a, state.select([k])) for k, (p, a) in enumerate(attempts)]

    def _fill(self) -> None:
        """Move waiting cohorts into the running batch, first fit; a cohort larger than ``max_batch`` runs when the
        batch is empty (a shard's round is never split: its samples reach the screen step together, so its
        previews are decoded and screened together, as in lock-step)."""
        for cohort in list(self._ready):
            if len(self._running) + len(cohort) <= self.max_batch or not self._running:
                self._ready.remove(cohort)
                self._running.extend(cohort)

    def _step(self) -> None:
        t0 = time.perf_counter()
        self.sampler.step_many([r.state for r in self._running])
        dt = time.perf_counter() - t0
        self._busy += dt
        for row in self._running:
            row.job.add_time("image", dt / len(self._running))
        screen_at = self.dsog.screen_step if self.dsog.enabled else None
        to_screen, done, keep = [], [], []
        for row in self._running:
            if row.state.done:
                done.append(row)
            elif screen_at is not None and not row.screened and row.state.step >= screen_at:
                to_screen.append(row)
            else:
                keep.append(row)
        self._running = keep
        if to_screen:
            self._send_screen(to_screen)
        for row in done:
            row.job.finished[row.pos] = row
        finished = [j for j in {id(r.job): r.job for r in done}.values() if len(j.finished) == j.size]
        if finished:
            self._send_rewards(finished)

    # -- screening -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _send_screen(self, rows: list[_Row]) -> None:
        """One screen call per shard for its samples that parked at this step (their previews decoded together)."""
        for job_rows in _by_job(rows):
            t0 = time.perf_counter()
            preview = self.engine.policy.vq.decode_uint8(
                torch.cat([self.sampler.preview_ids(r.state) for r in job_rows]))
            self._busy += time.perf_counter() - t0
            job = job_rows[0].job
            texts = [job.prep.screen_texts[r.pos] for r in job_rows]
            self._call("screen", job, job_rows, self.engine.scorer.screen, preview, texts,
                       [job.prep.req.concept] * len(job_rows))

    def _call(self, kind: str, job: _Job, payload, fn, *args) -> None:
        """Run ``fn(*args)`` on a call thread for one shard; ``payload``: its screened rows or its images."""
        self._inflight[self._calls.submit(fn, *args)] = (kind, job, payload, time.perf_counter())

    def _collect(self, block: bool) -> None:
        """Handle the calls that finished (waiting for one first when ``block``)."""
        if not self._inflight:
            return
        if block:
            wait(list(self._inflight), timeout=1.0, return_when=FIRST_COMPLETED)
        for fut in [f for f in self._inflight if f.done()]:
            kind, job, payload, started = self._inflight.pop(fut)
            job.add_time(kind, time.perf_counter() - started)
            try:
                out = fut.result()
            except Exception as exc:   # e.g. a required expert that kept failing: its shard fails, others go on
                self._drop(job, exc)
                continue
            if job.failed:
                continue
            if kind == "screen":   # the shard's rejected rows are redrawn as one cohort
                redraw = [r for row, score in zip(payload, np.asarray(out).reshape(-1))
                          for r in self._screened(row, float(score))]
                if redraw:
                    t0 = time.perf_counter()
                    self._ready.append(self._start(job, redraw))
                    self._busy += time.perf_counter() - t0
            else:
                self._rewarded(job, payload, *out)

    def _screened(self, row: _Row, score: float) -> list[tuple[int, int]]:
        """Record a screen score; returns the (position, attempt) redraws it calls for."""
        job = row.job
        row.screened = True
        if job.loops is None:   # screen-only or not calibrated yet: wait for every first attempt
            job.first[row.pos] = (score, row)
            if len(job.first) < job.size:
                return []
            firsts = [job.first[p] for p in range(job.size)]
            if job.prep.req.screen_only:
                job.prep.result.first_scores = [s for s, _ in firsts]
                self._complete(job)
                return []
            threshold = DSOGController.initial_threshold([s for s, _ in firsts], self.dsog)
            job.prep.result.init_threshold = threshold
            job.loops = [AttemptLoop(threshold, self.dsog.max_attempts) for _ in range(job.size)]
            return [d for s, r in firsts for d in self._decide(r, s)]
        return self._decide(row, score)

    def _decide(self, row: _Row, score: float) -> list[tuple[int, int]]:
        """Offer the attempt to its sample's loop: resume the kept attempt, or ask for the redraw."""
        job, pos = row.job, row.pos
        loop = job.loops[pos]
        res = loop.offer(score)
        job.parked[(pos, row.attempt)] = row
        keep = loop.candidate
        for key in [k for k in job.parked if k[0] == pos and k[1] != keep]:
            del job.parked[key]   # never kept: free its state
        if res is None:
            return [(pos, row.attempt + 1)]
        self._ready.appendleft([job.parked.pop((pos, res.kept_index))])
        return []

    # -- rewards -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _send_rewards(self, jobs: list[_Job]) -> None:
        """One reward call per finished shard (its images decoded together)."""
        for job in jobs:
            t0 = time.perf_counter()
            images = self.engine.policy.vq.decode_uint8(
                torch.cat([job.finished[p].state.final_ids for p in range(job.size)]))
            self._busy += time.perf_counter() - t0
            self._call("reward", job, images, self.engine.scorer.score, *job.prep.reward_args(images))

    def _rewarded(self, job: _Job, images, per_expert: dict, total, dropped) -> None:
        res = job.prep.result
        if job.loops is None:   # DSOG off: one attempt each, no screen
            screen, attempts = [float("nan")] * job.size, [1] * job.size
        else:
            kept = [loop.result for loop in job.loops]
            res.attempt_scores, res.attempt_accepted = attempt_major(job.loops)
            res.forced_keeps = sum(int(r.forced) for r in kept)
            screen, attempts = [r.kept_score for r in kept], [r.attempts for r in kept]
        finished = [(job.finished[p].state, 0) for p in range(job.size)]
        self.engine.finish(job.prep, finished, screen, attempts, images, per_expert, total, dropped)
        self._complete(job)

    def _complete(self, job: _Job) -> None:
        """Return the shard's result: with the actor's busy / held seconds and the backend's failures since the
        previous result (not on a screen-only shard, whose result the driver does not keep)."""
        res = job.prep.result
        if not job.prep.req.screen_only:
            now = time.perf_counter()
            held = self._held + (now - self._held_since if self._held_since is not None else 0.0)
            res.timings["busy"], res.timings["held"] = self._busy, held
            self._busy, self._held = 0.0, 0.0
            self._held_since = now if self._held_since is not None else None
            res.reward_failures = self.engine.failures_since(self._failures_seen)
            self._failures_seen = dict(self.engine._failure_totals())
        self._remove(job)
        job.future.set_result(res)

    def _drop(self, job: _Job, exc: BaseException) -> None:
        if job.failed:
            return
        job.failed = True
        self._remove(job)
        job.future.set_exception(exc)

    def _remove(self, job: _Job) -> None:
        self._jobs = [j for j in self._jobs if j is not job]
        self._running = [r for r in self._running if r.job is not job]
        self._ready = deque(c for c in self._ready if c[0].job is not job)
        job.parked.clear()
