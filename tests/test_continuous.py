"""The continuous-batching engine in-process (no Ray): the same samples, rewards and DSOG bookkeeping as the
lock-step engine, bit for bit on CPU with one torch thread, whatever the running batch's size and the mix of
shards in it; screening and rewards in the background; a failing reward call fails only its own shards."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from actors.driver.dispatch import shard_group
from actors.learner.step import concept_specs
from actors.rollout.continuous import ContinuousEngine
from actors.rollout.engine import GroupRequest, RolloutEngine
from actors.rollout.scoring import local_scorer
from backbone.build import build_policy
from configs.schema import load_config
from launch.bench.continuous import DelayedScorer
from rl.data.reader import load_concept_dataset
from rl.data.sample import write_sample_dataset

FIELDS = ("final_ids", "states", "chosen", "image_logps", "answer_ids", "answer_logps", "image")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "sample"
    write_sample_dataset(root, image_size=128, log=lambda *_: None)
    cfg = load_config("tiny_cpu", [f"data.root={root}", "rollout.group_size=4", "sampler.timesteps=8",
                                   "dsog.screen_step=3", "dsog.max_attempts=3", "rollout.answer_max_new_tokens=8"])
    ds = load_concept_dataset(root)
    torch.set_num_threads(1)
    policy = build_policy(cfg.model, concept_specs(ds))
    return RolloutEngine(cfg, policy, ds, local_scorer(cfg, ds))


def _same(a, b) -> None:
    """Two shard results hold identical samples and DSOG bookkeeping."""
    assert a.request == b.request
    assert (a.attempt_scores, a.attempt_accepted, a.forced_keeps, a.init_threshold, a.first_scores) == (
        b.attempt_scores, b.attempt_accepted, b.forced_keeps, b.init_threshold, b.first_scores)
    assert len(a.samples) == len(b.samples)
    for x, y in zip(a.samples, b.samples):
        for f in FIELDS:
            assert np.array_equal(getattr(x, f), getattr(y, f)), f
        assert (x.sample_index, x.reward, x.rewards, x.screen_score, x.attempts, x.attempt_scores, x.forced,
                x.prompt_text) == (y.sample_index, y.reward, y.rewards, y.screen_score, y.attempts,
                                   y.attempt_scores, y.forced, y.prompt_text)


def _shards(engine, per: int, thresholds) -> list:
    g = engine.cfg.rollout.group_size
    reqs = [GroupRequest(step=7, prompt_index=p, concept=c, threshold=t)
            for p, (c, t) in enumerate(zip(["chelsea", "astro", "cuppa"], thresholds))]
    return [sh for r in reqs for sh in shard_group(r, g, per)]


@pytest.fixture(scope="module")
def mid(engine):
    """A threshold near the median first-attempt score: redraws happen, some samples hit the cap."""
    probe = engine.generate_group(GroupRequest(step=7, prompt_index=0, concept="chelsea", threshold=None))
    return float(np.median(probe.attempt_scores))


@pytest.mark.parametrize("max_batch", [1, 3, 16])
@pytest.mark.parametrize("per", [1, 4])
def test_same_samples_as_lockstep(engine, mid, max_batch, per):
    """Shards of 1 and of the whole group, several groups at once (calibrating, mid threshold with redraws, a
    threshold nothing passes: forced keeps at the cap), every running-batch size: each shard's result equals the
    lock-step engine's, bit for bit."""
    shards = _shards(engine, per, [None, mid, 1e9]) if per == 4 else _shards(engine, per, [mid, mid, 1e9])
    want = [engine.generate_samples(sh) for sh in shards]
    cont = ContinuousEngine(engine, max_batch=max_batch, max_inflight_calls=2)
    try:
        futures = [cont.submit(sh) for sh in shards]
        got = [f.result(timeout=600) for f in futures]
    finally:
        cont.close()
    for a, b in zip(got, want):
        _same(a, b)
    assert sum(r.forced_keeps for r in got) >= engine.cfg.rollout.group_size   # the 1e9 group: all forced
    assert any(not all(r.attempt_accepted) for r in got[:-1]) and any(r.attempt_accepted for r in got)
    if per == 4:
        assert got[0].init_threshold is not None   # the uncalibrated whole-group shard calibrated itself
    # busy / held are the actor's seconds since its previous result (a shard finishing with another gets ~0)
    assert 0 < sum(r.timings["busy"] for r in got) <= sum(r.timings["held"] for r in got)
    assert all(r.timings["image"] > 0 and r.timings["reward"] > 0 for r in got)


def test_screen_only_shards(engine):
    req = GroupRequest(step=2, prompt_index=1, concept="astro", threshold=None)
    shards = shard_group(req, engine.cfg.rollout.group_size, 2, screen_only=True)
    want = [engine.generate_samples(sh) for sh in shards]
    cont = ContinuousEngine(engine, max_batch=4, max_inflight_calls=1)
    try:
        got = [f.result(timeout=300) for f in [cont.submit(sh) for sh in shards]]
    finally:
        cont.close()
    for a, b in zip(got, want):
        assert a.first_scores == b.first_scores and not a.samples


def test_generation_goes_on_while_calls_are_in_flight(engine, mid):
    """With every screen and reward call taking 0.3 s, the loop keeps stepping other samples meanwhile: the shards
    finish much sooner than the lock-step engine, which waits on each call, and with identical samples."""
    slow = DelayedScorer(engine.scorer, 0.3)
    blocking = RolloutEngine(engine.cfg, engine.policy, engine.dataset, slow)
    shards = _shards(engine, 1, [mid, mid, mid])
    t0 = time.perf_counter()
    want = [blocking.generate_samples(sh) for sh in shards]
    t_lock = time.perf_counter() - t0
    cont = ContinuousEngine(blocking, max_batch=16, max_inflight_calls=4)
    try:
        t0 = time.perf_counter()
        got = [f.result(timeout=600) for f in [cont.submit(sh) for sh in shards]]
        t_cont = time.perf_counter() - t0
    finally:
        cont.close()
    for a, b in zip(got, want):
        _same(a, b)
    assert slow.peak >= 2   # calls overlapped each other, not only the generation
    assert t_cont < t_lock   # the calls' waits are hidden (the benchmark measures by how much)
    busy = sum(r.timings["busy"] for r in got) / sum(r.timings["held"] for r in got)
    lock_busy = sum(r.timings["busy"] for r in want) / sum(r.timings["held"] for r in want)
    assert busy > lock_busy


class _FailingScore:
    """Rewards fail for one concept (a required expert down for it); screens and other concepts work."""

    def __init__(self, base, bad: str):
        self.base, self.bad = base, bad

    def screen(self, *args):
        return self.base.screen(*args)

    def score(self, images, texts, concepts, *rest):
        if self.bad in concepts:
            raise RuntimeError(f"reward expert down for {self.bad}")
        return self.base.score(images, texts, concepts, *rest)


def test_a_failing_reward_call_fails_only_its_shards(engine, mid):
    eng = RolloutEngine(engine.cfg, engine.policy, engine.dataset, _FailingScore(engine.scorer, "astro"))
    shards = _shards(engine, 4, [mid, mid, mid])
    cont = ContinuousEngine(eng, max_batch=4, max_inflight_calls=1)   # one shard at a time: no shared call
    try:
        futures = [cont.submit(sh) for sh in shards]
        with pytest.raises(RuntimeError, match="reward expert down for astro"):
            futures[1].result(timeout=300)
        ok = [futures[i].result(timeout=300) for i in (0, 2)]
        again = cont.submit(shards[0]).result(timeout=300)   # the loop is still serving
    finally:
        cont.close()
    assert all(len(r.samples) == engine.cfg.rollout.group_size for r in ok)
    _same(again, ok[0])


def test_bad_request_fails_its_caller_before_any_work(engine):
    cont = ContinuousEngine(engine, max_batch=4, max_inflight_calls=1)
    try:
        bad = dataclasses.replace(_shards(engine, 1, [0.5] * 3)[0], samples=(0, 0))
        with pytest.raises(ValueError, match="samples must be distinct"):
            cont.submit(bad).result(timeout=60)
        with pytest.raises(ValueError, match="max_batch and max_inflight_calls must be >= 1"):
            ContinuousEngine(engine, max_batch=0, max_inflight_calls=1)
    finally:
        cont.close()
    with pytest.raises(RuntimeError, match="closed"):
        cont.submit(_shards(engine, 1, [0.5] * 3)[0])
