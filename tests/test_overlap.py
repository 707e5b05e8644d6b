"""``run.overlap: one_step`` (issue 19): the next step's rollout beside the update, behaviour log-probs as old
log-probs, exact resume, and actor deaths during the overlapped phase.

The Ray tests compare against an uninterrupted overlapped run of the same config (module fixture): a run stopped and
resumed, a rollout actor SIGKILLed during an overlapped rollout (replaced from its peer, or, with no peer, the run
goes back to its checkpoint) and a learner rank SIGKILLed during the overlapped update all end with the same
metrics, samples and final weights, each step once in ``metrics.jsonl``.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch

from actors.learner.step import ToyBackend, old_logp_source
from configs.schema import load_config
from rl.grpo.config import ObjectiveConfig
from rl.grpo.objective import image_step_loss
from tests.conftest import record_samples
from tests.test_kill_matrix import _same_metrics, actor_pid, sigkill

STEPS = 4
OVERRIDES = [f"run.steps={STEPS}", "run.checkpoint_every=1", "run.keep_last=5", "run.image_grid_every=0",
             "run.overlap=one_step", "run.max_learner_restarts=4", "rollout.max_restarts=4",
             "serve.ber.max_batch_size=1", "sync.timeout_s=30", "rollout.samples_per_request=1"]
"""Shards of one sample, so the 2-actor run (peer case) has the same samples as the 1-actor reference (D7)."""


# ------------------------------------------------------------------------------------------- no Ray
def _toy_sample(seed: int, advantage: float):
    g = np.random.default_rng(seed)
    states = g.integers(0, 32, size=(3, 5))
    chosen = g.integers(0, 16, size=(3, 5))
    return SimpleNamespace(states=states, chosen=chosen, advantage=advantage,
                           image_logps=np.log(g.uniform(0.02, 0.2, size=(3, 5))).astype(np.float32),
                           mmu_input_ids=g.integers(0, 32, size=4), answer_ids=g.integers(0, 32, size=3),
                           answer_logps=np.log(g.uniform(0.02, 0.2, size=3)).astype(np.float32))


def test_old_logp_source_follows_run_overlap():
    assert old_logp_source(load_config("tiny_cpu")) == "learner"
    assert old_logp_source(load_config("tiny_cpu", ["run.overlap=one_step"])) == "rollout"
    with pytest.raises(ValueError, match="run.overlap"):
        load_config("tiny_cpu", ["run.overlap=two_steps"])


def test_overlapped_loss_uses_the_behaviour_logprobs_as_old_logprobs():
    """With behaviour log-probs the ratio is π_θ / π_behaviour (clipped), not 1: loss, gradient and clip fraction
    are rl.grpo.objective's with old = the rollout's recorded log-probs."""
    cfg = ObjectiveConfig()
    samples = [_toy_sample(1, 0.7), _toy_sample(2, -0.4)]
    on, off = ToyBackend(cfg, seed=3), ToyBackend(cfg, seed=3, old_logp="rollout")
    unit = SimpleNamespace(sample=1, kind="image", step=2, weight=1.0)
    loss_on, st_on = on.unit_loss(on.module, samples, unit, 2)
    loss_off, st_off = off.unit_loss(off.module, samples, unit, 2)
    s = samples[1]
    st_, ch = torch.tensor(s.states[2]), torch.tensor(s.chosen[2])
    logp = ToyBackend.image_logp(off.module, st_, ch)[None]
    with torch.no_grad():
        ref = ToyBackend.image_logp(off.reference, st_, ch)[None]
    want, want_st = image_step_loss(logp, torch.tensor(s.image_logps[2])[None], ref, [s.advantage], 3, 5, 2, cfg)
    torch.testing.assert_close(loss_off, want)
    assert st_off["clip_sum"] == pytest.approx(float(want_st["clip_frac"]) * 5)
    assert st_off["clip_sum"] > 0 and st_on["clip_sum"] == 0          # the behaviour ratio is far from 1 here
    assert not torch.allclose(loss_on, loss_off)
    g_off = torch.autograd.grad(loss_off, off.module["img"].weight)[0]
    g_want = torch.autograd.grad(want, off.module["img"].weight)[0]
    torch.testing.assert_close(g_off, g_want)
    answer = SimpleNamespace(sample=0, kind="answer", step=0, weight=1.0)
    a_on, _ = on.unit_loss(on.module, samples, answer, 2)
    a_off, _ = off.unit_loss(off.module, samples, answer, 2)
    assert not torch.allclose(a_on, a_off)
    with pytest.raises(ValueError, match="old log-prob source"):
        ToyBackend(cfg, old_logp="behaviour")


# ------------------------------------------------------------------------------------------- Ray
def _run(make_trainer, out, root, overrides=(), resume=None, hook=None):
    trainer = make_trainer(out, root, [*OVERRIDES, *overrides], resume=resume)
    seen: dict = {}
    record_samples(trainer, seen)
    if hook is not None:
        trainer.phase_hook = lambda phase, step: hook(trainer, phase, step)
    try:
        history = trainer.run()
        weights = trainer.learners.state_dict_rank0()
        rollout = ray.get(trainer.workers[0].state_dict.remote())
    finally:
        trainer.shutdown()
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(history=history, rows=rows, weights=weights, rollout=rollout, seen=seen,
                           run_dir=trainer.run_dir, learner_restarts=trainer.learner_restarts,
                           rollout_restarts=dict(trainer.rollout_restarts))


def _assert_same_run(ref, got):
    assert [r["step"] for r in got.rows] == list(range(STEPS))          # each step exactly once on disk
    bad = [x for a, b in zip(ref.rows, got.rows) for x in _same_metrics(a, b)]
    assert not bad, bad
    for step, samples in got.seen.items():
        assert samples == ref.seen[step], step                         # same prompts, answers, rewards (D7)
    for name, w in ref.weights.items():
        assert (got.weights[name] - w).abs().max().item() <= 1e-6, name
    for name, w in ref.rollout.items():
        assert (got.rollout[name] - w).abs().max().item() <= 1e-6, name


@pytest.fixture(scope="module")
def overlapped(shared_rewards, tmp_path_factory, sample_root):
    """The uninterrupted overlapped run (one rollout actor), its sequential twin, and the factory every run of this
    module uses (attached to the session's shared reward pool)."""
    from tests.conftest import make_trainer_factory

    make = make_trainer_factory(shared_rewards)
    return {"one_step": _run(make, tmp_path_factory.mktemp("overlap"), sample_root),
            "none": _run(make, tmp_path_factory.mktemp("sequential"), sample_root, ["run.overlap=none"]),
            "make": make}


@pytest.mark.slow
def test_overlapped_run_learns_one_step_off_policy(overlapped):
    ref, seq = overlapped["one_step"], overlapped["none"]
    lags = [r["learn/policy_lag"] for r in ref.rows]
    assert lags == [0.0] + [1.0] * (STEPS - 1) and all(r["learn/policy_lag"] == 0.0 for r in seq.rows)
    # step 0 is on-policy in both modes: the same samples; step 1's come from the initial weights when overlapped
    # and from the once-updated ones when not: same concepts, other samples
    assert ref.seen[0] == seq.seen[0] and ref.seen[1] != seq.seen[1]
    assert [c for c, _, _ in ref.seen[1]] == [c for c, _, _ in seq.seen[1]]
    # the same prompts and thresholds: DSOG's update does not lag
    assert [r["dsog/threshold"] for r in ref.rows[:2]] == [r["dsog/threshold"] for r in seq.rows[:2]]
    # step 1 learns from samples one update old: the ratio departs from 1 (clipping can act), the mismatch grows
    assert ref.rows[1]["learn/logp_mismatch_image"] > 10 * seq.rows[1]["learn/logp_mismatch_image"]
    ckpt = ref.run_dir / "checkpoints"
    assert (ckpt / "step_000002" / "next_rollout.pkl").is_file()
    assert not (ckpt / f"step_{STEPS:06d}" / "next_rollout.pkl").exists()   # no step after the last


@pytest.mark.slow
def test_overlapped_run_resumes_exactly(overlapped, tmp_path, sample_root):
    from actors.driver.trainer import Preempted

    ref, make = overlapped["one_step"], overlapped["make"]

    def stop_after_step_1(trainer, phase, step):   # SIGTERM's path: finish the step, checkpoint, stop
        if (phase, step) == ("sync", 1):
            trainer._stop_requested = True
    with pytest.raises(Preempted):
        _run(make, tmp_path, sample_root, hook=stop_after_step_1)
    ckpt = tmp_path / "tiny-cpu" / "checkpoints" / "step_000002"
    assert (ckpt / "next_rollout.pkl").is_file()
    got = _run(make, tmp_path, sample_root, resume="auto")
    assert sorted(got.seen) == [2, 3] and got.rows[2]["learn/policy_lag"] == 1.0   # the stored rollout was used
    _assert_same_run(ref, got)


def _kill_learner_at_overlap(fired: list):
    """Phase hook: SIGKILL learner rank 1 as the overlapped rollout of step 2 starts (the update of step 1 runs)."""
    def hook(trainer, phase, step):
        if not fired and (phase, step) == ("rollout", 2):
            fired.append(actor_pid(trainer.learners.workers[1]))
            sigkill(trainer.learners.workers[1])
    return hook


def _kill_rollout_at_overlap(fired: list):
    """Phase hook: once the overlapped rollout of step 2 has returned its first shard, SIGKILL rollout actor 0
    (before the dispatcher hands out the next shard, so the death lands inside the overlapped rollout)."""
    def hook(trainer, phase, step):
        if fired or (phase, step) != ("rollout", 2):
            return
        pool, run_tasks = trainer.dispatcher, trainer.dispatcher.run_tasks

        def killing_run_tasks(method, tasks, on_result=None):
            def on_shard(i, result):
                if not fired:
                    fired.append(actor_pid(trainer.workers[0]))
                    sigkill(trainer.workers[0])
                if on_result is not None:
                    on_result(i, result)
            pool.run_tasks = run_tasks   # once
            return run_tasks(method, tasks, on_shard)
        pool.run_tasks = killing_run_tasks
    return hook


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rollout, peer alive", "rollout, no peer", "learner"])
def test_actor_killed_during_the_overlapped_phase(case, overlapped, tmp_path, sample_root, caplog):
    """A kill while the next step's rollout runs beside the update (phase 'rollout' of step 2 is fired after
    'learn' of step 1)."""
    ref = overlapped["one_step"]
    extra = ["rollout.num_workers=2"] if case == "rollout, peer alive" else []
    fired: list = []
    hook = (_kill_learner_at_overlap if case == "learner" else _kill_rollout_at_overlap)(fired)
    with caplog.at_level("WARNING", logger="actors.driver.supervisor"):
        got = _run(overlapped["make"], tmp_path, sample_root, extra, hook=hook)
    assert fired
    messages = [r.getMessage() for r in caplog.records]
    _assert_same_run(ref, got)
    if case == "rollout, peer alive":   # replaced mid-rollout with its peer's weights, the learner untouched
        assert got.learner_restarts == 0 and got.rollout_restarts == {0: 1}
        assert "rollout actor 0 took rollout actor 1's weights (overlapped rollout)" in messages, messages
    elif case == "rollout, no peer":   # the weights were gone: back to the step-2 checkpoint, rebuilt once
        assert got.learner_restarts == 1 and got.rollout_restarts == {0: 1}
        assert any("no other rollout actor holds the weights" in m for m in messages), messages
    else:
        assert got.learner_restarts == 1 and got.rollout_restarts == {}
