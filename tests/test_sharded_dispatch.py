"""Sample-level dispatch on a real local Ray cluster with the continuous engine: the same samples, rewards, DSOG
bookkeeping and losses with 1, 2 and 3 rollout actors, for one group and for several, and as the lock-step engine;
a rollout actor killed with a running batch of shards in the middle of a sharded group."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import ray
import torch

from actors.driver.dispatch import GroupDispatcher, shard_group
from actors.rollout.engine import assemble_group
from actors.learner.step import make_showo_backend, run_units, schedule_units
from rl.grpo.objective import group_advantages

pytestmark = pytest.mark.slow

# both tests attach to the session's shared reward pool, whose experts score each request alone: a Serve batch
# merging two actors' requests could change a score's last bits


def _signature(results):
    out = []
    for r in results:
        out.append((r.request.prompt_index, tuple(r.attempt_scores), tuple(r.attempt_accepted), r.forced_keeps,
                    r.init_threshold, tuple((s.sample_index, s.final_ids.tobytes(), s.answer_ids.tobytes(),
                                             s.image_logps.tobytes(), s.reward, s.attempts) for s in r.samples)))
    return out


def _step_loss(backend, results):
    """The D5 step loss of the results' samples (advantages per group) at the initial weights, and its gradient
    norm: what the learner would compute, in process."""
    samples = []
    for r in results:
        adv = group_advantages(np.array([[s.reward for s in r.samples]]))[0]
        for s, a in zip(r.samples, adv):
            s.advantage = float(a)
        samples.extend(r.samples)
    backend.module.zero_grad(set_to_none=True)
    backend.begin_step()
    units = schedule_units(samples, 1, 0.4)[0]
    sums = run_units(backend.module, lambda loss: loss.backward(), backend, samples, units, world_size=1)
    grad = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in backend.module.parameters() if p.grad is not None))
    return sums["loss"], float(grad)


def test_one_two_or_three_rollout_actors_give_the_same_samples_and_losses(tmp_path, sample_root,
                                                                          make_shared_trainer):
    trainer = make_shared_trainer(tmp_path, sample_root, ["rollout.num_workers=3", "run.prompts_per_step=2",
                                                          "rollout.samples_per_request=1"])
    try:
        cfg = trainer.cfg
        backend = make_showo_backend(cfg, torch.device("cpu"))
        requests = trainer.plan(0)          # threshold None: the split groups run the calibration pass
        assert requests[0].threshold is None
        outcomes, fixed_requests = {}, None
        assert cfg.rollout.engine == "continuous"
        for n in (1, 2, 3):   # each actor holds several shards in its running batch
            d = GroupDispatcher(trainer.workers[:n], timeout_s=600, group_size=cfg.rollout.group_size,
                                samples_per_request=1, dsog=cfg.dsog,
                                per_actor=cfg.rollout.inflight_shards(cfg.rollout.group_size))
            one = d.run(requests[:1])
            several = d.run(requests)
            if fixed_requests is None:   # a calibrated threshold (redraws) and one nothing passes (forced keeps)
                fixed_requests = [dataclasses.replace(requests[0], threshold=several[0].init_threshold),
                                  dataclasses.replace(requests[1], threshold=1e9)]
            fixed = d.run(fixed_requests)
            outcomes[n] = (_signature(one), _signature(several), _signature(fixed), _step_loss(backend, several))
        # the deterministic mode (rollout.engine: lockstep, each shard alone and blocking) on one actor: the same
        # samples, bit for bit (CPU, one torch thread)
        def _lockstep(worker, shard):   # runs inside the actor (a closure: pickled by value, not by module name)
            return worker.engine.generate_samples(shard)

        lockstep = [assemble_group(r, [ray.get(trainer.workers[0].__ray_call__.remote(_lockstep, sh))
                                       for sh in shard_group(r, cfg.rollout.group_size, 1)])
                    for r in fixed_requests]
        assert _signature(lockstep) == outcomes[1][2]
        for n in (2, 3):
            assert outcomes[n][0] == outcomes[1][0], f"one group, {n} actors"
            assert outcomes[n][1] == outcomes[1][1], f"two groups, {n} actors"
            assert outcomes[n][2] == outcomes[1][2], f"fixed threshold, {n} actors"
            assert outcomes[n][3] == outcomes[1][3], f"step loss and gradient norm, {n} actors"
        sig = outcomes[1][1]
        assert [len(g[5]) for g in sig] == [cfg.rollout.group_size] * 2
        assert sig[0][4] is not None and sig[0][4] == outcomes[1][0][0][4]   # calibrated from the whole group
        # the calibrated threshold is the (1 - TPR) quantile of the group's first-attempt scores, as for an unsplit
        # group: attempt 0 of every sample is the first score it reports
        from rl.grpo.dsog import DSOGController

        firsts, pos = [], 0
        for s in sorted(sig[0][5]):
            firsts.append(sig[0][1][pos])
            pos += s[5]
        assert sig[0][4] == DSOGController.initial_threshold(firsts, cfg.dsog)
        assert np.isfinite(outcomes[1][3][0]) and outcomes[1][3][1] > 0
        forced = outcomes[1][2][1]
        assert forced[3] == cfg.rollout.group_size and all(s[5] == cfg.dsog.max_attempts for s in forced[5])
    finally:
        trainer.shutdown()


def test_a_rollout_actor_killed_in_the_middle_of_a_sharded_group(tmp_path, sample_root, make_shared_trainer):
    trainer = make_shared_trainer(tmp_path, sample_root, ["rollout.num_workers=2", "rollout.samples_per_request=1",
                                                          "rollout.group_size=6"])
    try:
        first = trainer.dispatcher.run(trainer.plan(0))   # warms up; calibrates the threshold the runs below use
        requests = [dataclasses.replace(trainer.plan(0)[0], threshold=first[0].init_threshold)]
        t0 = time.monotonic()
        clean = trainer.dispatcher.run(requests)
        clean_s = time.monotonic() - t0
        before = trainer.dispatcher.redispatched
        victim = trainer.workers[0]
        arrived = []
        assert trainer.dispatcher.per_actor >= 3
        # a third of the way into the step the victim holds its 3 shards (3 of the 6 in flight per actor), running
        # together in its batch: all of them are re-dispatched and come back the same
        timer = threading.Timer(clean_s / 3, lambda: ray.kill(victim, no_restart=True))
        timer.start()
        redone = trainer.dispatcher.run(requests, on_shard=arrived.append)
        timer.join()
        arrived = [sh.request.samples for sh in arrived]
        assert sorted(arrived) == [(i,) for i in range(6)], "every shard accepted exactly once"
        assert trainer.dispatcher.redispatched >= before + 2, "the victim's running batch was re-dispatched"
        assert trainer.workers[0] is not victim
        assert _signature(redone) == _signature(clean)
        assert [s.sample_index for s in redone[0].samples] == list(range(6))
    finally:
        trainer.shutdown()
