"""Faults on a real local Ray: a dead reward replica (also the screening one, hung with previews in flight) or rollout
actor costs a retry, not the step; SIGTERM saves. (A dead learner rank: tests/test_kill_matrix.py.)"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray

from actors.driver.checkpoint import read_checkpoint
from actors.driver.trainer import Preempted

pytestmark = pytest.mark.slow


def _signature(results):
    """Per group: prompt index, the samples' final image ids and rewards (rounded: a Serve batch that merges
    requests from two actors may change scores in the last float bits)."""
    return [(r.request.prompt_index, [s.final_ids.tobytes() for s in r.samples],
             [round(s.reward, 5) for s in r.samples]) for r in results]


def _kill_later(delay_s: float, find):
    """Kill the actor returned by ``find()`` after ``delay_s`` seconds (in a thread); returns the thread."""
    def run():
        time.sleep(delay_s)
        ray.kill(find(), no_restart=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _kill_when_holding(cfg, expert: str, after_s: float = 1.0, timeout_s: float = 300.0):
    """Kill ``expert``'s replica ``after_s`` after it reports holding a request (its ``describe()["held"]``), in a
    thread; returns the thread."""
    from ray import serve

    from actors.serving.deploy import app_name, deployment_name

    handle = serve.get_deployment_handle(deployment_name(expert), app_name(cfg.serve, expert))

    def run():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if handle.options(method_name="describe").remote().result(timeout_s=30)["held"] > 0:
                time.sleep(after_s)
                ray.kill(_serve_replica(cfg, expert), no_restart=False)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _serve_replica(cfg, expert: str):
    from actors.serving.deploy import replicas

    running = [r for r in replicas(cfg.serve, expert) if r["state"] == "RUNNING"]
    assert running, f"no running replica of {expert}"
    return ray.get_actor(running[0]["actor_name"], namespace="serve")


def test_dead_reward_replica_and_dead_rollout_actor_cost_a_retry_not_the_step(ray_cluster, tmp_path, sample_root, make_trainer):
    # DER requests wait up to 6 s in the replica for a batch to fill, so a kill lands while one is in flight; the
    # screen (BER) scores each request alone so DSOG decisions cannot depend on how requests were batched
    trainer = make_trainer(tmp_path, sample_root, ["rollout.num_workers=2", "run.prompts_per_step=2",
                                                   "serve.ber.max_batch_size=1", "serve.ber.retries=8",
                                                   "serve.der.retries=8", "serve.retry_backoff_s=1.0",
                                                   "serve.der.batch_wait_timeout_s=6.0", "serve.der.max_batch_size=64"])
    try:
        requests = trainer.plan(0)
        arrivals = []
        t0 = time.monotonic()
        clean = trainer.dispatcher.run(requests, on_shard=lambda _: arrivals.append(time.monotonic() - t0))
        assert sum(sum(r.reward_failures.values()) for r in clean) == 0

        # a reward replica dies during the step, 1 s after it took a request (held in its 6 s batch wait): same
        # rewards after the retry, the failure is counted
        killer = _kill_when_holding(trainer.cfg, "der")
        faulted = trainer.dispatcher.run(requests)
        killer.join()
        assert _signature(faulted) == _signature(clean)
        assert sum(r.reward_failures.get("der", 0) for r in faulted) >= 1

        # the screening replica (BER) hangs while previews are in flight, then dies: with the continuous engine the
        # parked samples wait on their screen calls, which are retried on the replacement replica; same samples
        from tests.test_kill_matrix import actor_pid

        ber_pid = actor_pid(_serve_replica(trainer.cfg, "ber"))
        os.kill(ber_pid, signal.SIGSTOP)     # every screen call from now on is stuck in flight
        killer = threading.Timer(min(arrivals) / 2, lambda: os.kill(ber_pid, signal.SIGKILL))
        killer.start()
        screened = trainer.dispatcher.run(requests)
        killer.join()
        assert _signature(screened) == _signature(clean)
        # the screen calls were held at the stopped replica until it died and Serve re-routed them to its replacement
        # (so the client may see no failure): they took seconds longer than in the clean run
        assert sum(r.timings["screen"] for r in screened) > sum(r.timings["screen"] for r in clean) + 2.0
        assert actor_pid(_serve_replica(trainer.cfg, "ber")) != ber_pid

        # a rollout actor dies during the step: its group is re-dispatched to a replacement; by D7 the samples are
        # the same, and every group comes back exactly once
        before = trainer.dispatcher.redispatched
        victim = trainer.workers[0]
        killer = _kill_later(0.5, lambda: victim)
        redone = trainer.dispatcher.run(requests)
        killer.join()
        assert trainer.dispatcher.redispatched == before + 1
        assert [r.request.prompt_index for r in redone] == [0, 1]
        assert _signature(redone) == _signature(clean)
        assert trainer.workers[0] is not victim
        # the replacement holds the learner's weights: the step still trains and syncs
        metrics = trainer.train_step(0)
        assert np.isfinite(metrics["learn/loss"])
    finally:
        trainer.shutdown()


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path, sample_root, make_shared_trainer):
    make_trainer = make_shared_trainer
    trainer = make_trainer(tmp_path, sample_root, ["run.steps=4", "run.checkpoint_every=100"])
    metrics_file = trainer.run_dir / "metrics.jsonl"

    def preempt():
        while not (metrics_file.exists() and metrics_file.read_text().strip()):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    try:
        with pytest.raises(Preempted):
            trainer.run()
    finally:
        trainer.shutdown()
    thread.join()
    latest = trainer.ckpt.latest()
    assert latest is not None
    state, _ = read_checkpoint(latest)
    stopped_at = state["next_step"]
    assert 1 <= stopped_at < 4
    resumed = make_trainer(tmp_path, sample_root, ["run.steps=4", "run.checkpoint_every=100"], resume="auto")
    try:
        assert resumed.start_step == stopped_at
        history = resumed.run()
    finally:
        resumed.shutdown()
    assert [m["step"] for m in history] == list(range(stopped_at, 4))
    lines = metrics_file.read_text().splitlines()
    assert len(lines) == 4          # the resumed run appended exactly the missing steps
