"""The driver-side controller: places the roles, runs the GRPO step loop, logs, checkpoints and resumes.

One step: plan the step's prompts (design D7) → rollout actors produce groups (answer IR, compound prompt,
MaskGIT with DSOG, rewards from the Serve deployments) → advantages per group → DSOG threshold update →
learner group update (DeepSpeed) → weight sync to the rollout actors → metrics, pictures, checkpoint.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import numpy as np
import ray

from actors.checkpoint import CheckpointManager, config_changes, read_checkpoint, resolve_resume
from actors.dispatch import GroupDispatcher
from actors.metrics import MetricsLogger
from actors.rollout_engine import GroupRequest
from actors.step_metrics import step_metrics
from configs.schema import TrainConfig, config_to_dict
from rl.dsog import DSOGController
from rl.objective import group_advantages

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised inside the step loop after SIGTERM once the checkpoint is written."""


class Trainer:
    """Owns the actors of one run and the step loop."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.run.keep_last)
        self.resume_from = resolve_resume(self.run_dir, resume)
        self.dsog = DSOGController(cfg.dsog)
        self.start_step = 0
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard)
        self.history: list[dict] = []
        self._stop_requested = False

    # -- set-up --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Deploy reward servers, place and start learner and rollout actors, connect weight sync."""
        from actors.learner import LearnerGroup
        from actors.placement import RolePlacement
        from actors.reward_serve import deploy_rewards
        from actors.rollout import RolloutWorker
        from rl.data import load_concept_dataset

        cfg = self.cfg
        t0 = time.perf_counter()
        self.dataset = load_concept_dataset(cfg.data.root, concepts=cfg.data.concepts or None)
        self.concepts = sorted(self.dataset.concepts)
        log.info("dataset %s: %d concepts (%s)", cfg.data.root, len(self.concepts), ", ".join(self.concepts))
        self.placement = RolePlacement(cfg)
        deploy_rewards(cfg.serve, data_root=cfg.data.root)
        log.info("reward deployments ready (%.1fs)", time.perf_counter() - t0)
        self.learners = LearnerGroup(cfg, self.placement)
        cfg_dict = config_to_dict(cfg)

        def make_worker(i: int):
            opts = self.placement.rollout_options(i)
            return RolloutWorker.options(**opts).remote(cfg_dict, i)

        self._make_worker = make_worker
        self.workers = [make_worker(i) for i in range(cfg.rollout.num_workers)]
        ray.get([w.ready.remote() for w in self.workers])
        log.info("%d rollout actors ready (%.1fs)", len(self.workers), time.perf_counter() - t0)
        self.dispatcher = GroupDispatcher(self.workers, replace_actor=self._replace_worker,
                                          timeout_s=cfg.rollout.group_timeout_s)
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.learners.connect_rollouts(self.workers)
        self.learners.sync_weights(self.workers)
        log.info("set-up done in %.1fs", time.perf_counter() - t0)

    def _replace_worker(self, slot: int):
        """A fresh rollout actor for a dead one, with the current weights."""
        log.warning("replacing rollout actor %d", slot)
        worker = self._make_worker(slot)
        ray.get(worker.ready.remote())
        self.workers[slot] = worker
        self.learners.connect_rollouts(self.workers)
        self.learners.sync_weights(self.workers)
        return worker

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        state, saved_cfg = read_checkpoint(path)
        changes = config_changes(saved_cfg, config_to_dict(self.cfg))
        if changes:
            log.warning("resuming with a changed config (%d keys): %s", len(changes), "; ".join(changes[:10]))
        self.learners.load_checkpoint(str(path / "learner"))
        self.dsog.load_state_dict(state["dsog"])
        self.start_step = int(state["next_step"])
        self.metrics.truncate_after(self.start_step - 1)
        log.info("resumed from %s at step %d", path, self.start_step)

    def save_checkpoint(self, next_step: int) -> Path:
        """Write an atomic checkpoint whose resume point is ``next_step``."""
        tmp = self.ckpt.begin(next_step)
        self.learners.save_checkpoint(str(tmp / "learner"))
        state = {"next_step": next_step, "dsog": self.dsog.state_dict(), "seed": self.cfg.run.seed}
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
        """One GRPO step; returns its metrics."""
        t0 = time.perf_counter()
        requests = self.plan(step)
        results = self.dispatcher.run(requests)
        t_rollout = time.perf_counter() - t0
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
            self.dsog.observe_batch(scores, accepted)
        t1 = time.perf_counter()
        learn = self.learners.train_step(samples)
        t2 = time.perf_counter()
        sync_s = self.learners.sync_weights(self.workers)
        t3 = time.perf_counter()
        times = {"rollout": t_rollout, "learn": t2 - t1, "sync": t3 - t2, "step": t3 - t0}
        metrics = step_metrics(step, results, samples, learn, self.dsog, times, self.dispatcher)
        metrics["sync/seconds"] = float(sync_s)
        return metrics

    def run(self) -> list[dict]:
        """The whole run: steps from the resume point to ``run.steps``, checkpoints, final save."""
        cfg = self.cfg
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            log.warning("SIGTERM: finishing the current step, writing a checkpoint, then exiting")
            self._stop_requested = True

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread
            previous = None
        try:
            from actors.pictures import save_image_grid, save_reward_curves

            for step in range(self.start_step, cfg.run.steps):
                metrics = self.train_step(step)
                self.history.append(metrics)
                self.metrics.log(metrics)
                if step % cfg.run.log_every == 0 or step == cfg.run.steps - 1:
                    print(self.metrics.line(metrics), flush=True)
                if cfg.run.image_grid_every and (step + 1) % cfg.run.image_grid_every == 0:
                    save_image_grid(self.run_dir / "images" / f"step_{step + 1:06d}.png", self._last_samples)
                    save_reward_curves(self.run_dir / "reward_curves.png", self.run_dir)
                done = step + 1
                if self._stop_requested:
                    self.save_checkpoint(done)
                    raise Preempted(f"stopped by SIGTERM after step {step}; resume with --resume auto")
                if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
                    self.save_checkpoint(done)
            self.learners.export_final(str(self.run_dir / "final"))
            save_reward_curves(self.run_dir / "reward_curves.png", self.run_dir)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.metrics.close()
        return self.history

    def shutdown(self) -> None:
        """Stop actors and deployments started by this trainer."""
        for w in getattr(self, "workers", []):
            ray.kill(w)
        if hasattr(self, "learners"):
            self.learners.shutdown()
        if hasattr(self, "placement"):
            self.placement.remove()
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
