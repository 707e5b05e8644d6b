"""Learner-group recovery: a dead or hung learner rank costs the steps since the last checkpoint, not the run.

DeepSpeed ranks share collectives, so one dead rank leaves the others blocked until their (short) collective
timeout. The controller therefore never tries to patch a single rank: it tears the whole group down, builds a new
one, loads the newest complete checkpoint (or the seeded initial weights when there is none), re-syncs the rollout
actors and re-runs the steps since — identical by design D7.
"""
from __future__ import annotations

import logging

from ray.exceptions import GetTimeoutError, RayActorError

from actors.checkpoint import read_checkpoint
from actors.learner import LearnerTimeout
from actors.weight_sync import WeightSyncError

log = logging.getLogger(__name__)

LEARNER_FAILURES = (RayActorError, GetTimeoutError, LearnerTimeout, WeightSyncError)
"""Exceptions that mean the learner group (or its sync group) is broken and must be rebuilt."""


class LearnerRecoveryFailed(RuntimeError):
    """The learner group kept failing after ``run.max_learner_restarts`` rebuilds."""


def rebuild_learners(trainer, error: BaseException) -> int:
    """Tear down ``trainer.learners``, rebuild it from the last checkpoint; returns the step to continue from."""
    from actors.learner import LearnerGroup

    trainer.learner_restarts += 1
    limit = trainer.cfg.run.max_learner_restarts
    if trainer.learner_restarts > limit:
        raise LearnerRecoveryFailed(f"learner group failed {trainer.learner_restarts} times "
                                    f"(run.max_learner_restarts={limit}); last error: {error}") from error
    latest = trainer.ckpt.latest()
    log.error("learner group failed (%s: %s); tearing it down and rebuilding it from %s (restart %d/%d)",
              type(error).__name__, str(error).strip().splitlines()[0] if str(error).strip() else "",
              latest or "the initial weights", trainer.learner_restarts, limit)
    try:
        trainer.learners.shutdown()
    except Exception as exc:  # the group is already broken; what matters is that its actors are gone
        log.warning("learner shutdown after failure: %s", exc)
    trainer.learners = LearnerGroup(trainer.cfg, trainer.placement)
    if latest is not None:
        state, _ = read_checkpoint(latest)
        trainer.learners.load_checkpoint(str(latest / "learner"))
        trainer.dsog.load_state_dict(state["dsog"])
        next_step = int(state["next_step"])
    else:
        trainer.dsog = type(trainer.dsog)(trainer.cfg.dsog)
        next_step = 0
    trainer.metrics.truncate_after(next_step - 1)
    trainer.history = [m for m in trainer.history if m["step"] < next_step]
    trainer.learners.connect_rollouts(trainer.workers)
    trainer.learners.sync_weights(trainer.workers)
    log.warning("learner group rebuilt; continuing from step %d", next_step)
    return next_step
