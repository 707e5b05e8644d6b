"""The rollout engine in-process (no Ray): one group end to end, D7 determinism, DSOG attempts."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.learner.step import concept_specs
from actors.rollout.engine import GroupRequest, RolloutEngine
from actors.rollout.scoring import local_scorer
from backbone.build import build_policy
from configs.schema import load_config
from rl.data.reader import load_concept_dataset
from rl.data.sample import write_sample_dataset
from rl.grpo.batch import validate_batch


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "sample"
    write_sample_dataset(root, image_size=128, log=lambda *_: None)
    cfg = load_config("tiny_cpu", [f"data.root={root}", "rollout.group_size=3", "sampler.timesteps=8",
                                   "dsog.screen_step=3", "rollout.answer_max_new_tokens=8"])
    ds = load_concept_dataset(root)
    torch.set_num_threads(1)
    policy = build_policy(cfg.model, concept_specs(ds))
    return RolloutEngine(cfg, policy, ds, local_scorer(cfg, ds))


def test_group_end_to_end_and_deterministic(engine):
    req = GroupRequest(step=3, prompt_index=1, concept="chelsea", threshold=None)
    first = engine.generate_group(req)
    g, t, n = engine.cfg.rollout.group_size, engine.cfg.sampler.timesteps, engine.policy.vq.num_tokens
    assert len(first.samples) == g
    validate_batch(first.samples)
    for s in first.samples:
        assert s.states.shape == (t, n) and s.chosen.shape == (t, n) and s.image_logps.shape == (t, n)
        assert s.image.dtype == np.uint8 and s.image.shape[-1] == 3
        assert np.isfinite(s.reward) and set(s.rewards) == {"tier", "ber", "der"}   # an animal: no FER
        assert s.states[0].min() == engine.policy.tok.mask_id          # starts fully masked
        assert (s.final_ids < engine.policy.tok.codebook_size).all()
        assert 1 <= s.attempts <= engine.cfg.dsog.max_attempts
        assert len(s.answer_ids) == len(s.answer_logps) <= engine.cfg.rollout.answer_max_new_tokens
    # the first batch initialises the DSOG threshold from its own screen scores (D6)
    assert first.init_threshold is not None
    assert len(first.attempt_scores) >= g
    # D7: same request -> bit-identical samples (seeded per sample, not per batch or actor)
    again = engine.generate_group(req)
    for a, b in zip(first.samples, again.samples):
        assert np.array_equal(a.final_ids, b.final_ids) and np.array_equal(a.answer_ids, b.answer_ids)
        assert a.reward == b.reward


def test_threshold_that_nothing_passes_keeps_best_attempt_at_the_cap(engine):
    req = GroupRequest(step=0, prompt_index=0, concept="cuppa", threshold=1e9)
    res = engine.generate_group(req)
    cap = engine.cfg.dsog.max_attempts
    assert res.forced_keeps == engine.cfg.rollout.group_size
    assert all(s.attempts == cap for s in res.samples)
    assert not any(res.attempt_accepted) and len(res.attempt_scores) == cap * len(res.samples)
    # the kept attempt is the best-screened one of each sample
    scores = np.array(res.attempt_scores).reshape(cap, -1)
    assert np.allclose([s.screen_score for s in res.samples], scores.max(0))


def test_shards_screen_only_and_assembly(engine):
    """A group split into single-sample shards: the screen-only pass gives each shard's first-attempt scores, the
    shards run with the calibrated threshold give a complete group whatever order they are assembled in, and a
    shard re-run (another actor, by D7) is bit-identical."""
    from actors.driver.dispatch import shard_group
    from actors.rollout.engine import assemble_group
    from rl.grpo.dsog import DSOGController

    g = engine.cfg.rollout.group_size
    req = GroupRequest(step=2, prompt_index=0, concept="chelsea", threshold=None)
    assert [s.samples for s in shard_group(req, g, 1)] == [(i,) for i in range(g)]
    assert [s.samples for s in shard_group(req, 5, 2)] == [(0, 1), (2, 3), (4,)]
    assert [s.samples for s in shard_group(req, g, 0)] == [tuple(range(g))]
    first = [engine.generate_samples(s) for s in shard_group(req, g, 1, screen_only=True)]
    assert all(len(r.first_scores) == 1 and not r.samples for r in first)
    threshold = DSOGController.initial_threshold([r.first_scores[0] for r in first], engine.cfg.dsog)
    calibrated = GroupRequest(step=2, prompt_index=0, concept="chelsea", threshold=threshold)
    shards = [engine.generate_samples(s) for s in shard_group(calibrated, g, 1)]
    for r, f in zip(shards, first):   # attempt 0 of the full run is the screen-only attempt, bit for bit
        assert r.attempt_scores[0] == f.first_scores[0]
    group = assemble_group(calibrated, list(reversed(shards)))
    assert [s.sample_index for s in group.samples] == list(range(g))
    assert group.attempt_scores == [x for r in shards for x in r.attempt_scores]
    assert group.forced_keeps == sum(r.forced_keeps for r in shards)
    assert sum(s.attempts for s in group.samples) == len(group.attempt_scores)
    again = engine.generate_samples(shard_group(calibrated, g, 1)[1])
    assert np.array_equal(again.samples[0].final_ids, shards[1].samples[0].final_ids)
    assert again.samples[0].reward == shards[1].samples[0].reward
    with pytest.raises(ValueError, match="samples must be distinct"):
        engine.generate_samples(dataclasses.replace(shard_group(calibrated, g, 1)[0], samples=(0, 0)))


def _rounds(res, g: int) -> list[list[float]]:
    """Split a shard's attempt-major screen log into rounds: round r holds the samples with more than r attempts."""
    attempts = [s.attempts for s in sorted(res.samples, key=lambda s: s.sample_index)]
    log, out, pos = list(res.attempt_scores), [], 0
    for r in range(max(attempts)):
        n = sum(a > r for a in attempts)
        out.append(log[pos:pos + n])
        pos += n
    assert pos == len(log) and len(attempts) == g
    return out


@pytest.mark.parametrize("threshold", [None, "mid"])
def test_engine_decisions_are_the_dsog_rule(engine, threshold):
    """Replaying the engine's screen scores through rl.grpo.dsog's AttemptBatch (the one attempt rule) gives the
    engine's decisions: passed flags, attempts, forced keeps, kept screen scores and the first step's calibrated
    threshold. On the uncalibrated first step the calibrated T₀ judges the first attempts too (not all pass)."""
    from rl.grpo.dsog import AttemptBatch, select_attempt

    g, cap = engine.cfg.rollout.group_size, engine.cfg.dsog.max_attempts
    if threshold == "mid":
        probe = engine.generate_group(GroupRequest(step=5, prompt_index=2, concept="astro", threshold=None))
        threshold = float(np.median(probe.attempt_scores))
    res = engine.generate_group(GroupRequest(step=5, prompt_index=2, concept="astro", threshold=threshold))
    rule = AttemptBatch(g, threshold, cap, calibrate=engine.cfg.dsog)
    for scores in _rounds(res, g):
        rule.offer(np.asarray(scores, dtype=np.float32))
    assert rule.done and rule.passed == res.attempt_accepted and rule.forced == res.forced_keeps
    assert rule.init_threshold == res.init_threshold
    used = threshold if threshold is not None else res.init_threshold
    for s, r in zip(res.samples, rule.results):
        assert (s.attempts, s.screen_score) == (r.attempts, r.kept_score)
        assert (s.attempt_scores, s.forced) == (r.scores, r.forced)   # the sample's own DSOG record agrees
        assert select_attempt(r.scores, used, cap) == r
    if threshold is None:
        assert not all(res.attempt_accepted[:g])


class _ScriptedScreen:
    """The local scorer with scripted DSOG screen scores, one list per screen call (the rewards stay real)."""

    def __init__(self, base, rounds):
        self.base, self.rounds, self.calls = base, [list(r) for r in rounds], 0

    def screen(self, images, texts, concepts):
        out = np.asarray(self.rounds[self.calls], dtype=np.float32)
        assert len(out) == len(images) == len(texts), (len(out), len(images))
        self.calls += 1
        return out

    def score(self, *args):
        return self.base.score(*args)


def test_forced_keep_resumes_the_kept_attempt(engine):
    """Sample 0 passes in round 0, sample 2 in round 1, sample 1 ties at the cap and keeps its first attempt: each
    finished image continues the attempt the rule kept (its pre-pause MaskGIT steps are that attempt's)."""
    g, cap, k = engine.cfg.rollout.group_size, engine.cfg.dsog.max_attempts, engine.cfg.dsog.screen_step
    assert (g, cap) == (3, 2)
    req = dict(step=4, prompt_index=0, concept="chelsea")
    scripted = RolloutEngine(engine.cfg, engine.policy, engine.dataset,
                             _ScriptedScreen(engine.scorer, [[0.9, 0.4, 0.1], [0.4, 0.7]]))
    res = scripted.generate_group(GroupRequest(threshold=0.5, **req))
    assert scripted.scorer.calls == 2
    assert [s.attempts for s in res.samples] == [1, 2, 2] and res.forced_keeps == 1
    assert res.attempt_accepted == [True, False, False, False, True]
    assert [s.screen_score for s in res.samples] == [float(np.float32(x)) for x in (0.9, 0.4, 0.7)]
    # the same round-0 batch with everything passing: samples 0 and 1 kept attempt 0, sample 2 did not
    first = RolloutEngine(engine.cfg, engine.policy, engine.dataset, _ScriptedScreen(engine.scorer, [[1.0] * 3]))
    ref = first.generate_group(GroupRequest(threshold=0.5, **req)).samples
    for i in (0, 1):
        assert np.array_equal(res.samples[i].chosen[:k], ref[i].chosen[:k])
    assert not np.array_equal(res.samples[2].chosen[:k], ref[2].chosen[:k])
