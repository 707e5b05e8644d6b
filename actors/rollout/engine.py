"""One GRPO group, end to end, on one device: answer IR → compound prompt → MaskGIT with DSOG → rewards.

Pure orchestration over backbone/rl/rewards code (no Ray here): :class:`actors.rollout.worker.RolloutWorker` wraps it in
a Ray actor, tests drive it in-process. Every random draw is seeded from (run seed, step, prompt, sample, attempt)
(design D7), so a group's samples do not depend on which actor produced them or on batching.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from backbone.answer import generate_answers
from backbone.maskgit import MaskGITSampler
from backbone.prompts import build_mmu_inputs, build_t2i_inputs
from rl.grpo.batch import RolloutSample, per_sample_attempts
from rl.grpo.dsog import AttemptBatch
from rl.grpo.seeding import make_generator, sample_seed
from rl.grpo.tasks import (
    ConceptPromptTokens,
    build_compound_prompt,
    build_understanding_prompt,
    reward_prompt,
    sample_task,
    text_budget,
)

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the engine needs from the reward side (Ray Serve client on the cluster, in-process in tests)."""

    def screen(self, images: np.ndarray, texts: list[str], concepts: list[str]) -> np.ndarray:
        """DSOG screen scores of preview images, float32 [B]."""

    def score(self, images: np.ndarray, texts: list[str], concepts: list[str], categories: list[str],
              answers: list[str], candidates: list[list[str]], targets: list[int]) -> tuple[dict, np.ndarray, list]:
        """(per-expert scores {name: [B]}, total [B], dropped expert names)."""


@dataclass
class GroupRequest:
    """One prompt's group of G samples to produce."""

    step: int
    prompt_index: int
    concept: str
    threshold: float | None
    """Current DSOG threshold; None at the first batch (the engine then initialises it from this group)."""


@dataclass
class SampleRequest:
    """A shard of one prompt's group: the samples ``samples`` (indices into 0..G-1) of (step, prompt_index).

    The unit of sample-level dispatch (actors/driver/dispatch.py). By D7 its result depends only on these fields, not on
    the actor that runs it. ``threshold`` must be set when the group is split over several requests (a None
    threshold calibrates from this request's own first-attempt scores); ``screen_only`` asks only for the first
    attempt's screen scores (the calibration pass of a group whose threshold is not known yet)."""

    step: int
    prompt_index: int
    concept: str
    threshold: float | None
    samples: tuple[int, ...]
    """Sample indices of this shard (their seeds, D7), in increasing order."""
    screen_only: bool = False
    """Stop after screening attempt 0 of every sample: the result carries ``first_scores`` and no samples."""


@dataclass(kw_only=True)
class RolloutBookkeeping:
    """What producing samples leaves besides the samples: DSOG attempts, timings and reward-service trouble. A shard
    (:class:`SampleResult`) carries its own; a group (:class:`GroupResult`) the sum over its shards
    (:func:`assemble_group`)."""

    attempt_scores: list[float] = field(default_factory=list)
    """Screen score of every attempt made (kept or not), attempt-major within a shard, shards in sample order."""
    attempt_accepted: list[bool] = field(default_factory=list)
    """Whether each attempt passed the threshold (parallel to ``attempt_scores``)."""
    forced_keeps: int = 0
    """Samples kept at the attempt cap although below the threshold."""
    init_threshold: float | None = None
    """The threshold this shard / group initialised (only when the request carried None)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Rollout-actor seconds per phase (summed over a group's shards): answer, image (MaskGIT), screen, reward; and
    the actor's ``busy`` seconds (generating: answers, MaskGIT, decoding) out of its ``held`` seconds (holding work)
    since its previous result, whose ratio over a step is ``rollout/busy_fraction``."""
    dropped: list[str] = field(default_factory=list)
    """Optional reward experts dropped (their weight renormalised away)."""
    reward_failures: dict[str, int] = field(default_factory=dict)
    """Failed reward-server attempts (retried or not) per expert while producing the samples."""


@dataclass
class SampleResult(RolloutBookkeeping):
    """What a shard produced: its samples plus its share of the group's DSOG and reward bookkeeping."""

    request: SampleRequest
    samples: list[RolloutSample]
    first_scores: list[float] = field(default_factory=list)
    """``screen_only``: the first attempt's screen score of each sample, in ``request.samples`` order."""


@dataclass
class GroupResult(RolloutBookkeeping):
    """A finished group plus what the controller needs to update DSOG and metrics."""

    request: GroupRequest
    samples: list[RolloutSample]


class RolloutEngine:
    """Produces groups with a policy (model + tokenizer + concept tokens + MAGVIT-v2) and a scorer."""

    def __init__(self, cfg, policy, dataset, scorer: Scorer, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.policy = policy
        self.dataset = dataset
        self.scorer = scorer
        self.device = torch.device(device)
        self.sampler = MaskGITSampler(policy.model, policy.tok, cfg.sampler)

    # -- seeds ---------------------------------------------------------------------------------------------
    def _gen(self, req: GroupRequest, sample: int, attempt: int, stream: str) -> torch.Generator:
        seed = sample_seed(self.cfg.run.seed, req.step, req.prompt_index, sample, attempt, stream)
        return make_generator(seed, device=self.device)

    def _rng(self, req: GroupRequest, stream: str) -> np.random.Generator:
        return np.random.default_rng(sample_seed(self.cfg.run.seed, req.step, req.prompt_index, -1, 0, stream))

    def _failure_totals(self) -> dict[str, int]:
        """Cumulative failed reward attempts of the scorer's backend (Serve client), per expert."""
        return dict(getattr(getattr(self.scorer, "backend", None), "failure_totals", {}) or {})

    # -- phases --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _answers(self, req, task, question: str, idx: list[int]):
        tok, rcfg = self.policy.tok, self.cfg.rollout
        g = len(idx)
        image_ids = self.policy.vq.encode(task.image[None]).to(self.device)
        mmu = build_mmu_inputs(tok, image_ids.repeat(g, 1), [question] * g)
        gens = [self._gen(req, i, 0, "answer") for i in idx]
        return mmu, generate_answers(self.policy.model, tok, mmu, max_new_tokens=rcfg.answer_max_new_tokens,
                                     temperature=rcfg.answer_temperature, top_k=rcfg.answer_top_k,
                                     generators=gens)

    @torch.no_grad()
    def _t2i(self, prompts: list[str]):
        return build_t2i_inputs(self.policy.tok, prompts, self.policy.vq.num_tokens,
                                max_text_len=self.cfg.rollout.max_text_len)

    def _images_with_dsog(self, req, idx, prompts, screen_texts, concept, result: SampleResult):
        """MaskGIT for every sample with the DSOG screen and redraws; returns finished sampler states per sample.

        Which attempt is kept is decided by :class:`rl.grpo.dsog.AttemptBatch` (the one DSOG attempt rule); this
        method only draws each round's pending samples as one batch, screens their previews in one call, and
        resumes the kept attempts in the batches ``AttemptBatch.resume_plan`` gives. DSOG off: one attempt, no
        screen (screen score NaN).

        ``idx``: the samples' indices in the group (their D7 seeds); lists here are in ``idx`` order, so local
        position ``i`` draws with the seeds of sample ``idx[i]``."""
        dcfg = self.cfg.dsog
        g = len(screen_texts)
        if not dcfg.enabled:
            state = self.sampler.start(self._t2i(prompts), [self._gen(req, idx[i], 0, "image") for i in range(g)])
            state = self.sampler.run(state)
            return [(state, i) for i in range(g)], [float("nan")] * g, [1] * g
        loops = AttemptBatch(g, req.threshold, dcfg.max_attempts, calibrate=dcfg)   # the DSOG attempt rule (D6)
        paused: dict[int, object] = {}   # round -> its paused sampler state, while it holds a (would-be) kept attempt
        while not loops.done:
            rnd, pending = loops.round, loops.pending
            state = self.sampler.start(self._t2i([prompts[i] for i in pending]),
                                       [self._gen(req, idx[i], rnd, "image") for i in pending])
            state = self.sampler.run(state, stop_after_step=dcfg.screen_step)
            preview = self.policy.vq.decode_uint8(self.sampler.preview_ids(state))
            t_screen = time.perf_counter()
            scores = self.scorer.screen(preview, [screen_texts[i] for i in pending], [concept] * len(pending))
            result.timings["screen"] = result.timings.get("screen", 0.0) + time.perf_counter() - t_screen
            if req.screen_only:
                result.first_scores = [float(x) for x in scores]
                return None, None, None
            loops.offer(scores)
            paused[rnd] = state
            for gone in set(paused) - loops.live_rounds():
                del paused[gone]
        result.attempt_scores.extend(loops.scores)
        result.attempt_accepted.extend(loops.passed)
        result.forced_keeps += loops.forced
        if loops.init_threshold is not None:
            result.init_threshold = loops.init_threshold
        # resume every kept attempt to the end, batched per round that drew it (AttemptBatch.resume_plan's order)
        finished = {}
        for rnd, members in loops.resume_plan():
            state = paused[rnd]
            rows = [row for _, row in members]
            sub = state if rows == list(range(state.batch_size)) else state.select(rows)
            sub = self.sampler.run(sub)
            for k, (i, _) in enumerate(members):
                finished[i] = (sub, k)
        kept = loops.results
        return [finished[i] for i in range(g)], [r.kept_score for r in kept], [r.attempts for r in kept]

    def generate_group(self, req: GroupRequest) -> GroupResult:
        """Produce the G samples of one prompt in one batch (with rewards; advantages are the controller's job).

        A None threshold is initialised from this group's first-attempt screen scores (D6)."""
        shard = SampleRequest(step=req.step, prompt_index=req.prompt_index, concept=req.concept,
                              threshold=req.threshold, samples=tuple(range(self.cfg.rollout.group_size)))
        return assemble_group(req, [self.generate_samples(shard)])

    def generate_samples(self, req: SampleRequest) -> SampleResult:
        """Produce the samples ``req.samples`` of one prompt's group (or, ``screen_only``, their first screen
        scores), lock-step: the shard's attempts of one round run as one batch, and the actor waits for each screen
        and for the rewards. By D7 every sample is the same whichever shard or actor produces it, provided the
        shard's composition is the same (batched float arithmetic may depend on the batch)."""
        t0 = time.perf_counter()
        failures_before = dict(self._failure_totals())
        job = self.prepare(req)
        result = job.result
        t1 = time.perf_counter()
        finished, screen_scores, attempts = self._images_with_dsog(req, job.idx, job.prompts, job.screen_texts,
                                                                   req.concept, result)
        if req.screen_only:
            result.timings.update(answer=t1 - t0,
                                  image=time.perf_counter() - t1 - result.timings.get("screen", 0.0))
            return result
        final_ids = torch.stack([state.trajectory.final_ids[k] for state, k in finished])
        images = self.policy.vq.decode_uint8(final_ids)
        t3 = time.perf_counter()
        per_expert, total, dropped = self.scorer.score(*job.reward_args(images))
        t4 = time.perf_counter()
        self.finish(job, finished, screen_scores, attempts, images, per_expert, total, dropped)
        result.reward_failures = self.failures_since(failures_before)
        result.timings.update(answer=t1 - t0, image=t3 - t1 - result.timings.get("screen", 0.0), reward=t4 - t3,
                              busy=t3 - t0 - result.timings.get("screen", 0.0), held=t4 - t0)
        return result

    def failures_since(self, before: dict[str, int]) -> dict[str, int]:
        """Failed reward attempts per expert since the snapshot ``before`` (of :meth:`_failure_totals`)."""
        after = self._failure_totals()
        return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}

    @torch.no_grad()
    def prepare(self, req: SampleRequest) -> "PreparedShard":
        """Everything of a shard before its images: the request checked, the task drawn, the answers generated, the
        compound prompts and the screen / reward texts built (both engines start here). Shards are never batched
        together here: the answer log-probs would then depend on the batch's composition in their last bits."""
        cfg, tok = self.cfg, self.policy.tok
        idx = [int(i) for i in req.samples]
        g = cfg.rollout.group_size
        if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= g:
            raise ValueError(f"SampleRequest.samples must be distinct indices in 0..{g - 1}, got {req.samples}")
        if req.screen_only and not cfg.dsog.enabled:
            raise ValueError("SampleRequest.screen_only needs dsog.enabled")
        info = self.dataset.concept(req.concept).info
        mcfg = cfg.model
        tokens = ConceptPromptTokens.from_concept_tokens(
            self.policy.concepts[req.concept], num_understanding=mcfg.num_understanding_tokens,
            num_generation=mcfg.num_generation_tokens)
        task = sample_task(self.dataset, req.concept, self._rng(req, "task"), text_ratio=cfg.data.text_task_ratio,
                           style=cfg.data.prompt_style)
        question = build_understanding_prompt(task, tokens)
        mmu, answers = self._answers(req, task, question, idx)
        prompts, cuts = [], []
        for text in answers.texts:
            cp, cut = build_compound_prompt(task, text, tokens, tok, budget=text_budget(cfg.rollout.max_text_len))
            prompts.append(cp)
            cuts.append(cut)
        screen_texts = [reward_prompt(p, tokens, info.class_word, style=task.style) for p in prompts]
        return PreparedShard(req=req, idx=idx, info=info, task=task, mmu=mmu, answers=answers, prompts=prompts,
                             cuts=cuts, screen_texts=screen_texts, result=SampleResult(request=req, samples=[]))

    def finish(self, job: "PreparedShard", finished, screen_scores, attempts, images, per_expert, total,
               dropped) -> SampleResult:
        """The shard's :class:`RolloutSample` s from its finished sampler states ``finished[i] = (state, row)``, kept
        screen scores, attempt counts, decoded images and rewards (both engines end here)."""
        req, result, answers, mmu, task = job.req, job.result, job.answers, job.mmu, job.task
        t2i = self._t2i(job.prompts)
        dsog_log = per_sample_attempts(result.attempt_scores, result.attempt_accepted, list(attempts))
        for i, (state, k) in enumerate(finished):
            traj = state.trajectory
            m = answers.mask[i]
            result.samples.append(RolloutSample(
                step=req.step, prompt_index=req.prompt_index, sample_index=job.idx[i], concept=req.concept,
                category=job.info.category, task_kind=task.kind,
                mmu_input_ids=mmu.input_ids[i, mmu.input_ids.shape[1] - mmu.prompt_lens[i]:].cpu().numpy(),
                answer_ids=answers.ids[i][m].cpu().numpy(),
                answer_logps=answers.logps[i][m].float().cpu().numpy(), answer_text=answers.texts[i],
                prompt_text=job.prompts[i], prompt_cut=job.cuts[i],
                t2i_input_ids=t2i.input_ids[i].cpu().numpy(), uncond_input_ids=t2i.uncond_input_ids[i].cpu().numpy(),
                states=traj.states[k].cpu().numpy(), chosen=traj.chosen[k].cpu().numpy(),
                image_logps=traj.logps[k].float().cpu().numpy(), final_ids=traj.final_ids[k].cpu().numpy(),
                image=images[i], screen_score=float(screen_scores[i]), attempts=int(attempts[i]),
                rewards={name: float(v[i]) for name, v in per_expert.items()}, reward=float(total[i]),
                advantage=0.0, question=task.question, reference=task.reference, input_image=task.image_name,
                reward_text=job.screen_texts[i], attempt_scores=dsog_log[i][0], forced=dsog_log[i][1]))
        result.dropped = list(dropped)
        return result


@dataclass
class PreparedShard:
    """A shard between :meth:`RolloutEngine.prepare` and :meth:`RolloutEngine.finish`: the answers and prompts of
    its samples (lists in ``idx`` order) and the result being filled."""

    req: SampleRequest
    idx: list[int]
    """The samples' indices in the group (their D7 seeds)."""
    info: object
    task: object
    mmu: object
    answers: object
    prompts: list[str]
    cuts: list[bool]
    screen_texts: list[str]
    """The screen and reward text of each sample (the generation prompt, D8)."""
    result: SampleResult

    def reward_args(self, images: np.ndarray) -> tuple:
        """The ``Scorer.score`` arguments for the shard's decoded ``images`` (in ``idx`` order)."""
        if self.task.kind == "text":
            candidates, target = self.task.candidates, self.task.target_index
        else:   # visual-instruct: TIER compares with the reference answer (answer mode)
            candidates, target = [self.task.reference], -1
        n = len(self.idx)
        return (images, list(self.screen_texts), [self.req.concept] * n, [self.info.category] * n,
                list(self.answers.texts), [candidates] * n, [target] * n)


def assemble_group(req: GroupRequest, shards: list[SampleResult]) -> GroupResult:
    """One GroupResult from a group's shard results (any arrival order): samples in sample order, attempts in shard
    order, forced keeps / timings / failures summed, dropped experts united."""
    shards = sorted(shards, key=lambda r: r.request.samples[0])
    out = GroupResult(request=req, samples=[s for r in shards for s in r.samples])
    out.samples.sort(key=lambda s: s.sample_index)
    for r in shards:
        out.attempt_scores.extend(r.attempt_scores)
        out.attempt_accepted.extend(r.attempt_accepted)
        out.forced_keeps += r.forced_keeps
        for k, v in r.timings.items():
            out.timings[k] = out.timings.get(k, 0.0) + v
        for k, v in r.reward_failures.items():
            out.reward_failures[k] = out.reward_failures.get(k, 0) + v
        for d in r.dropped:
            if d not in out.dropped:
                out.dropped.append(d)
        if r.init_threshold is not None and out.init_threshold is None:
            out.init_threshold = r.init_threshold
    return out
