"""The driver-side controller: places the roles, runs the GRPO step loop, logs, checkpoints and resumes.

One step: plan the step's prompts (design D7) → rollout actors produce groups (answer IR, compound prompt,
MaskGIT with DSOG, rewards from the Serve deployments) → advantages per group → DSOG threshold update →
learner group update (DeepSpeed) → weight sync to the rollout actors → metrics, pictures, checkpoint.

With ``run.overlap: one_step`` the update of step k and the rollout of step k+1 run at the same time (the rollout
with the weights from before update k); the sync follows when both are done. See :meth:`Trainer.train_step`.
"""
from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np
import ray

from actors.driver.checkpoint import (
    RNG_FILE,
    CheckpointManager,
    config_changes,
    resume_candidates,
    rng_state,
    set_rng_state,
    write_hashed,
)
from actors.driver.dispatch import GroupDispatcher
from actors.driver.pending_rollout import PendingRollout, save_pending
from actors.driver.restore import RunState, restore_run_state
from actors.driver.supervisor import Supervisor
from actors.rollout.engine import GroupRequest
from actors.telemetry.logger import MetricsLogger
from actors.telemetry.step_metrics import step_metrics
from configs.schema import TrainConfig, config_to_dict
from rl.data.reader import load_dataset
from rl.grpo.dsog import DSOGController
from rl.grpo.objective import group_advantages

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised inside the step loop after SIGTERM once the checkpoint is written."""


class Trainer:
    """Owns the actors of one run and the step loop.

    ``resume``: None (start at step 0), "auto" (the run folder's latest complete checkpoint, if any) or a
    checkpoint / run folder. Resume is exact: learner weights + optimizer (DeepSpeed checkpoint), DSOG state,
    counters and RNG states are restored, and every random draw derives from (seed, step, prompt, sample,
    attempt) (D7), so the data position is just the next step.
    """

    def __init__(self, cfg: TrainConfig, resume: str | None = None, dataset=None):
        self.cfg = cfg
        self.dataset = dataset
        """The training dataset (loaded and checked by the driver before Ray starts; None = load in setup)."""
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.run.keep_last)
        self.resume_candidates, self.resume_explicit = resume_candidates(self.run_dir, resume)
        """Checkpoints a resume tries, newest first (``--resume PATH``: just that one, explicit: no fall-back)."""
        self.resume_from = self.resume_candidates[0] if self.resume_candidates else None
        if resume == "auto" and self.resume_from is None:
            log.info("--resume auto: no complete checkpoint in %s, starting at step 0", self.run_dir)
        self.dsog = DSOGController(cfg.dsog)
        self.start_step = 0
        from actors.telemetry.trackers import make_trackers

        tensorboard = cfg.run.tensorboard and "tensorboard" in cfg.run.trackers
        self.metrics = MetricsLogger(self.run_dir, tensorboard=tensorboard, run_name=cfg.run.name,
                                     total_steps=cfg.run.steps,
                                     trackers=make_trackers(cfg.run, self.run_dir, config_to_dict(cfg)))
        self.history: list[dict] = []
        self._stop_requested = False
        self.supervisor: Supervisor | None = None
        """Keeps the roles healthy: replaces rollout actors, rebuilds the learner group (set up in ``setup``)."""
        self._last_samples: list = []
        self.pending: PendingRollout | None = None
        """``run.overlap: one_step``: the finished rollout of the next step (made during the last update)."""
        self.overlapping = False
        """True while a rollout runs beside a learner update (a replacement rollout actor then copies a peer's
        weights: the learner's are already being updated)."""
        self.phase_hook = None
        """Optional ``hook(phase, step)`` called as each phase starts: "rollout", "learn", "sync", "checkpoint"
        (after the checkpoint's temporary folder exists). The seam the kill-matrix tests inject faults through."""

    @property
    def learner_restarts(self) -> int:
        """Times the learner group was rebuilt after a failure in this run (bounded by run.max_learner_restarts)."""
        return self.supervisor.learner_rebuilds if self.supervisor is not None else 0

    @property
    def rollout_restarts(self) -> dict[int, int]:
        """Rollout actors that died, per slot (bounded by rollout.max_restarts)."""
        return self.rollouts.deaths if getattr(self, "rollouts", None) is not None else {}

    # -- set-up --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Deploy reward servers, place and start learner and rollout actors, restore a checkpoint, sync."""
        try:
            self._setup()
        except BaseException:   # a failed set-up gives back what it started (placement groups, rewards, actors)
            self.shutdown()
            raise

    def _setup(self) -> None:
        from actors.cluster.placement import RolePlacement
        from actors.learner.group import LearnerGroup
        from actors.learner.step import concept_specs, make_showo_backend
        from actors.rollout.pool import RolloutPool
        from actors.rollout.worker import RolloutWorker, actor_options
        from actors.serving.deploy import app_name
        from actors.serving.metrics import ReplicaDeathWatch
        from actors.serving.pool import RewardPool
        from actors.telemetry.setup_log import concept_checkpoint_lines, role_line, watch_reward_replicas

        cfg = self.cfg
        t0 = time.perf_counter()
        self.rewards = RewardPool(cfg.serve)   # owned (deleted in shutdown) or a shared pool (left alone)
        self.rewards.check()
        if self.dataset is None:
            self.dataset = load_dataset(cfg.data)
        self.concepts = sorted(self.dataset.concepts)
        log.info("dataset %s: %d concepts (%s)", cfg.data.root, len(self.concepts), ", ".join(self.concepts))
        for line in concept_checkpoint_lines(cfg.model, self.concepts):   # the policy's order (sorted)
            log.info("%s", line)
        self.placement = RolePlacement(cfg)
        t_rewards = time.perf_counter()
        # submitted now, waited for after the learner and rollout actors have started: the replicas load their
        # models while the learner group initialises (references read once here, with data.reader)
        self.rewards.start(data_root=self.dataset)
        # the dataset was read and decoded once, in this driver: the learner ranks get the concept list, the rollout
        # actors the dataset itself through the object store
        learner_backend = functools.partial(make_showo_backend, concepts=concept_specs(self.dataset))
        dataset_ref = ray.put(self.dataset)

        def make_learners():
            return LearnerGroup(cfg, self.placement, backend_factory=learner_backend)

        t = time.perf_counter()
        self.learners = make_learners()
        log.info("%s", role_line("learner", cfg, self.placement, time.perf_counter() - t))
        cfg_dict = config_to_dict(cfg)

        def make_worker(i: int):
            return RolloutWorker.options(**self.placement.rollout_options(i), **actor_options(cfg)).remote(
                cfg_dict, i, dataset_ref)

        t = time.perf_counter()
        self.rollouts = RolloutPool(make_worker, cfg.rollout.num_workers, cfg.rollout.max_restarts,
                                    start_timeout_s=cfg.placement.ready_timeout_s + 600.0)
        self.workers = self.rollouts.workers   # the pool's own list: replacements show here
        self.rollouts.wait_ready()
        log.info("%s", role_line("rollout", cfg, self.placement, time.perf_counter() - t))
        self.rewards.wait_ready()
        self.replica_watch = ReplicaDeathWatch({e: app_name(cfg.serve, e) for e in cfg.serve.enabled})
        log.info("%s", role_line("rewards", cfg, None, time.perf_counter() - t_rewards))
        self._replica_gauge_stop = watch_reward_replicas(cfg.serve)
        self.supervisor = Supervisor(cfg, self.rollouts, make_learners, self._restore_into)
        self.dispatcher = GroupDispatcher(self.workers, replace_actor=self._replace_worker,
                                          timeout_s=cfg.rollout.group_timeout_s, group_size=cfg.rollout.group_size,
                                          samples_per_request=cfg.rollout.samples_per_request, dsog=cfg.dsog,
                                          per_actor=cfg.rollout.inflight_shards(cfg.rollout.group_size))
        self._restore()
        # only now (after _restore) do the rollout actors receive the learner's weights: restored ones on resume
        self.learners.connect_rollouts(self.workers)
        self.learners.sync_weights(self.workers)
        if cfg.run.overlap == "one_step":
            log.info("schedule: run.overlap=one_step: step k+1's rollout runs beside step k's update with the weights "
                     "before it; old log-probs = the rollout's recorded ones (learn/policy_lag 1)")
        log.info("set-up done in %.1fs", time.perf_counter() - t0)

    def _replace_worker(self, slot: int, cause: BaseException | None = None):
        """The dispatcher's callback for a dead rollout actor: the supervisor replaces it (learner rank 0's current
        weights, or during an overlapped rollout a surviving rollout actor's); the learner group is not touched."""
        return self.supervisor.replace_rollout(self.learners, slot, cause, overlapping=self.overlapping)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Load the resume checkpoint (if any) and align metrics.jsonl / TensorBoard with the start step."""
        if self.resume_candidates:
            restored = restore_run_state(self.resume_candidates, self.learners, explicit=self.resume_explicit,
                                         make_dsog=functools.partial(DSOGController, self.cfg.dsog))
            self.resume_from = path = restored.path
            self._warn_changes(restored)
            self.rewind(restored)
            log.info("resumed from %s at step %d (saved by revision %s)", path, self.start_step,
                     (path / "git_revision.txt").read_text().strip() if (path / "git_revision.txt").exists() else "?")
            return
        if self.ckpt.latest() is not None:
            log.warning("run folder %s already has checkpoints (latest %s); starting again at step 0 and "
                        "replacing them. Pass --resume auto to continue instead.", self.run_dir,
                        self.ckpt.latest().name)
        self.metrics.start_at(self.start_step)

    def _warn_changes(self, restored: RunState) -> None:
        """Warn when the run resumes with another config or data order than the checkpoint was written with (read
        from what the restore already verified and parsed)."""
        state, path = restored.state or {}, restored.path
        changes = config_changes(restored.config or {}, config_to_dict(self.cfg))
        if changes:
            log.warning("resuming from %s with a changed config (%d keys): %s", path, len(changes),
                        "; ".join(changes[:10]) + (" ..." if len(changes) > 10 else ""))
        data = state.get("data", {})
        if data and (data.get("concepts") != self.concepts
                     or data.get("prompts_per_step") != self.cfg.run.prompts_per_step):
            log.warning("resuming with a different data order: concepts %s -> %s, prompts_per_step %s -> %s",
                        data.get("concepts"), self.concepts, data.get("prompts_per_step"),
                        self.cfg.run.prompts_per_step)

    def _restore_into(self, learners) -> RunState:
        """What a rebuilt learner group continues from (the supervisor's ``restore``): the newest checkpoint that
        verifies and loads, loaded into it (older ones on failure, with a warning naming the file), or step 0 with the
        seeded initial weights when there is none (actors/driver/restore.py)."""
        return restore_run_state(self.ckpt.candidates(warn=True), learners,
                                 make_dsog=functools.partial(DSOGController, self.cfg.dsog))

    def rewind(self, rs: RunState) -> int:
        """Continue from ``rs``: DSOG state, stored next-step rollout, counters and RNG states as saved; metrics and
        history cut back to its step. Returns the step to run next."""
        dsog = DSOGController(self.cfg.dsog)
        if rs.dsog is not None:
            dsog.load_state_dict(rs.dsog)
        self.dsog = dsog
        self.pending = rs.pending
        if getattr(self, "dispatcher", None) is not None:
            self.dispatcher.redispatched = rs.redispatched
        if rs.rng is not None:
            set_rng_state(rs.rng)
        self.start_step = rs.next_step
        self.metrics.start_at(rs.next_step)
        self.history = [m for m in self.history if m["step"] < rs.next_step]
        return rs.next_step

    def save_checkpoint(self, next_step: int) -> Path:
        """Write an atomic checkpoint whose resume point is ``next_step`` (see actors/driver/checkpoint.py)."""
        tmp = self.ckpt.begin(next_step)
        self._phase("checkpoint", next_step - 1)
        self.learners.save_checkpoint(str(tmp / "learner"))
        write_hashed(tmp / RNG_FILE, json.dumps(rng_state()))
        if self.pending is not None and self.pending.step == next_step:
            save_pending(tmp, self.pending)   # the next step's finished rollout (run.overlap): resume stays exact
        state = {"next_step": next_step, "seed": self.cfg.run.seed, "dsog": self.dsog.state_dict(),
                 "data": {"concepts": list(getattr(self, "concepts", [])),
                          "prompts_per_step": self.cfg.run.prompts_per_step},
                 "counters": {"redispatched_groups": int(getattr(self.dispatcher, "redispatched", 0))}}
        final = self.ckpt.commit(tmp, next_step, state, config_to_dict(self.cfg))
        log.info("checkpoint written: %s", final)
        return final

    # -- the step ------------------------------------------------------------------------------------------
    def plan(self, step: int) -> list[GroupRequest]:
        """The step's prompts: concepts round-robin over (step, prompt index), deterministic (D7)."""
        n = self.cfg.run.prompts_per_step
        threshold = self.dsog.threshold if self.dsog.initialized else None
        return [GroupRequest(step=step, prompt_index=p,
                             concept=self.concepts[(step * n + p) % len(self.concepts)], threshold=threshold)
                for p in range(n)]

    def train_step(self, step: int) -> dict:
        """One GRPO step; returns its metrics (see actors/telemetry/step_metrics.py).

        ``run.overlap: none``: rollout → update → sync. ``one_step``: the step's rollout is normally already done
        (``self.pending``, made during the previous update); the update is submitted, the next step's rollout runs
        on the rollout actors meanwhile, then the sync. The first step of a run (or of a resume from a checkpoint
        without a stored rollout) rolls out first, as an on-policy step (``learn/policy_lag`` 0)."""
        overlap = self.cfg.run.overlap == "one_step"
        t0 = time.perf_counter()
        pending, self.pending = self.pending, None
        lag, t_rollout = 1, 0.0
        if not overlap or pending is None or pending.step != step:
            self._phase("rollout", step)
            results = self.dispatcher.run(self.plan(step))
            lag, t_rollout = 0, time.perf_counter() - t0
        else:
            results = pending.results
        samples = self._consume(results)
        t1 = time.perf_counter()
        self._phase("learn", step)
        update = self.learners.submit_update(samples)
        if overlap and step + 1 < self.cfg.run.steps:
            self._phase("rollout", step + 1)
            t = time.perf_counter()
            self.overlapping = True
            try:   # D7: the same requests and samples as when run after the sync, only older weights
                self.pending = PendingRollout(step + 1, self.dispatcher.run(self.plan(step + 1)))
            finally:
                self.overlapping = False
            t_rollout += time.perf_counter() - t
        learn = dict(self.learners.collect_update(update), policy_lag=float(lag))
        t2 = time.perf_counter()
        self._phase("sync", step)
        sync_s = self.supervisor.sync(self.learners)   # a rollout actor dead since the dispatch is replaced here
        t3 = time.perf_counter()
        times = {"rollout": t_rollout, "learn": t2 - t1, "sync": t3 - t2, "step": t3 - t0}
        watch = getattr(self, "replica_watch", None)   # replicas that died, even where Serve re-routed the request
        metrics = step_metrics(step, results, samples, learn, self.dsog, times, self.dispatcher,
                               threshold_used=results[0].request.threshold if results else None,
                               experts=self.cfg.serve.enabled,
                               replicas_lost=sum(watch.poll().values()) if watch is not None else 0.0)
        metrics["sync/seconds"] = float(sync_s)
        return metrics

    def _consume(self, results: list) -> list:
        """The step's samples in id order with their group advantages; the DSOG controller observes the step's
        screen scores (initialised by the first step's calibration)."""
        for res in results:
            if res.init_threshold is not None and not self.dsog.initialized:
                self.dsog.initialize(res.init_threshold)
        samples = []
        for res in results:
            rewards = np.array([[s.reward for s in res.samples]], dtype=np.float64)
            adv = group_advantages(rewards)[0]
            for s, a in zip(res.samples, adv):
                s.advantage = float(a)
            samples.extend(res.samples)
        samples.sort(key=lambda s: (s.prompt_index, s.sample_index))
        self._last_samples = samples
        scores = [x for res in results for x in res.attempt_scores]
        accepted = [x for res in results for x in res.attempt_accepted]
        if self.cfg.dsog.enabled and scores:
            self.dsog.observe_batch(scores, accepted, forced=sum(r.forced_keeps for r in results))
        return samples

    def _phase(self, phase: str, step: int) -> None:
        if self.phase_hook is not None:
            self.phase_hook(phase, step)

    def run(self) -> list[dict]:
        """The whole run: steps from the resume point to ``run.steps`` under a progress bar (a metrics line per
        ``run.log_every`` steps above it), pictures, checkpoints, the final export. SIGTERM finishes the current
        step, writes a checkpoint and raises :class:`Preempted`."""
        from tqdm import tqdm

        cfg = self.cfg
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            log.warning("SIGTERM: finishing the current step, writing a checkpoint, then exiting")
            self._stop_requested = True

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread
            previous = None
        bar = tqdm(total=cfg.run.steps, initial=self.start_step, desc="GRPO", unit="step", file=sys.stdout,
                   dynamic_ncols=True, disable=None)   # no bar when stdout is not a terminal (job logs)
        try:
            step = self.start_step
            while step < cfg.run.steps:
                try:
                    step = self._run_step(step, bar)
                except Exception as exc:   # a role failed: the supervisor brings every role back
                    if (isinstance(exc, Preempted) or self.supervisor is None
                            or not self.supervisor.learner_failed(self.learners, exc)):
                        raise
                    self.learners, restored = self.supervisor.recover(self.learners, exc)
                    step = self.rewind(restored)
                    bar.n = step
            bar.close()
            self.learners.export_final(str(self.run_dir / "final"))
            self._save_curves()
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.metrics.close()
        return self.history

    def _run_step(self, step: int, bar) -> int:
        """One step with its logging, pictures, evaluation and checkpoint; returns the next step. A learner failure
        anywhere in here (update, sync, checkpoint) propagates to :meth:`run`, which rebuilds the group."""
        from tqdm import tqdm

        cfg = self.cfg
        metrics = self.train_step(step)
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            metrics.update(ray.get(self.workers[0].evaluate.remote(step + 1)))
        self.history.append(metrics)
        self.metrics.log(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/total']:.4f}", refresh=False)
        if step % cfg.run.log_every == 0 or step == cfg.run.steps - 1:
            tqdm.write(self.metrics.line(metrics), file=sys.stdout)
        self._after_step(step, metrics)
        done = step + 1
        if self._stop_requested:
            self.save_checkpoint(done)
            raise Preempted(f"stopped by SIGTERM after step {step}; resume with --resume auto")
        if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
            self.save_checkpoint(done)
        return done

    def _after_step(self, step: int, metrics: dict) -> None:
        """Per-step extras after logging: the step's sample records every ``run.samples_every`` (also handed to the
        trackers), the image grid and reward curves every ``run.image_grid_every``."""
        from actors.telemetry import samples as records

        if records.due(step, self.cfg.run.samples_every) and self._last_samples:
            try:
                path, rows = records.write_samples(self.run_dir, step + 1, self._last_samples,
                                                   experts=self.cfg.serve.enabled,
                                                   threshold=metrics.get("dsog/threshold"))
            except OSError as exc:   # a full disk costs the records, not the run
                log.warning("sample records of step %d not written: %s", step + 1, exc)
            else:
                self.metrics.log_samples(path, rows, step)
        every = self.cfg.run.image_grid_every
        if every and (step + 1) % every == 0:
            from actors.telemetry.pictures import save_image_grid

            path = save_image_grid(self.run_dir / "images" / f"step_{step + 1:06d}.png", self._last_samples,
                                   title=f"{self.cfg.run.name} step {step + 1}/{self.cfg.run.steps} "
                                         f"({metrics.get('concepts', '')}; reward {metrics['reward/total']:.4f})")
            self.metrics.log_image("images/grid", path, step)
            self._save_curves(step)

    def _save_curves(self, step: int | None = None) -> None:
        from actors.telemetry.pictures import save_reward_curves

        path = save_reward_curves(self.run_dir / "reward_curves.png", self.run_dir)
        if path is not None:
            self.metrics.log_image("reward_curves", path, self.cfg.run.steps - 1 if step is None else step)

    def shutdown(self) -> None:
        """Stop what this trainer started: rollout actors, learner ranks, placement groups and (``serve.mode:
        owned``) the reward applications. Safe after a failed or partial ``setup``; each part is attempted."""
        if getattr(self, "_replica_gauge_stop", None) is not None:
            self._replica_gauge_stop.set()
        self.metrics.close()
        steps = [("rollout actors", lambda: self.rollouts.shutdown() if hasattr(self, "rollouts") else None),
                 ("learner ranks", lambda: self.learners.shutdown() if hasattr(self, "learners") else None),
                 ("placement groups", lambda: self.placement.remove() if hasattr(self, "placement") else None),
                 ("reward applications", lambda: self.rewards.close() if hasattr(self, "rewards") else None)]
        for what, stop in steps:
            try:
                stop()
            except Exception as exc:
                log.warning("shutdown: stopping the %s failed: %s", what, exc)
