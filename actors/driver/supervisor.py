"""The run supervisor: which roles are unhealthy now, and what brings each back (issue 23).

Roles and what each exposes:

* **rollout pool** (:class:`actors.rollout.pool.RolloutPool`): dead slots, replace a slot. Rollout actors hold only
  weights: a dead one is replaced, the learner is not touched.
* **learner group** (:class:`actors.learner.group.LearnerGroup`): dead ranks. Ranks share collectives, so the group
  is never patched: it is torn down and rebuilt from the newest intact checkpoint (or the seeded initial weights),
  and the steps since are re-run — identical by design D7.
* **reward pool**: Ray Serve replaces dead replicas and its controller itself; the reward client retries around them.

:meth:`Supervisor.recover` is the one recovery loop: it names the cause Ray gives (out of memory with the node's
figures, a lost node, a crash), then in one pass rebuilds the learner group, replaces every rollout actor that died
in the same event and re-syncs; a failure during that pass starts another pass, up to ``run.max_learner_restarts``.
The supervisor never touches the trainer: it returns the new learner group and the restored run state, which the
trainer applies (:meth:`actors.driver.trainer.Trainer.rewind`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from actors.cluster.deaths import classify, is_actor_death
from actors.cluster.weight_sync import WeightSyncError
from actors.learner.group import LearnerTimeout
from actors.rollout.pool import RolloutPool, RolloutRecoveryFailed

log = logging.getLogger(__name__)

__all__ = ["LearnerRecoveryFailed", "RolloutRecoveryFailed", "RolloutWeightsLost", "Supervisor"]


class RolloutWeightsLost(RuntimeError):
    """Every rollout actor holding the weights of an overlapped rollout died: the step cannot be reproduced from the
    learner (already updated), so the run goes back to its last checkpoint."""


class LearnerRecoveryFailed(RuntimeError):
    """The learner group kept failing after ``run.max_learner_restarts`` rebuilds."""


LEARNER_FAILURES = (LearnerTimeout, WeightSyncError, RolloutWeightsLost)
"""Errors (besides an actor death) that mean the learner group or its sync group is broken, or that the run must go
back to its last checkpoint."""


class Supervisor:
    """Keeps one run's roles healthy. ``make_learners()`` builds a new learner group; ``restore(learners)`` loads the
    newest intact checkpoint into it and returns the run state to continue from (an object with ``next_step``)."""

    def __init__(self, cfg: Any, rollouts: RolloutPool, make_learners: Callable[[], Any],
                 restore: Callable[[Any], Any]):
        self.cfg = cfg
        self.rollouts = rollouts
        self.make_learners = make_learners
        self.restore = restore
        self.learner_rebuilds = 0
        """Times the learner group was rebuilt in this run (bounded by ``run.max_learner_restarts``)."""
        self._building = None

    # -- diagnosis ---------------------------------------------------------------------------------------------
    def learner_failed(self, learners: Any, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by a step) means the learner group is broken or the run must roll back: a
        learner-side error, an actor death, or any error while a learner rank is dead (e.g. gloo's "connection
        closed" when rank 0 died mid-sync)."""
        if isinstance(exc, LEARNER_FAILURES) or is_actor_death(exc):
            return True
        return bool(learners.dead_ranks(settle_s=1.0))

    # -- rollout side ------------------------------------------------------------------------------------------
    def replace_rollout(self, learners: Any, slot: int, cause: BaseException | None = None,
                        overlapping: bool = False):
        """A fresh rollout actor in ``slot``. Normally it loads learner rank 0's current weights; during an
        overlapped rollout (``run.overlap: one_step``) the learner is already updating, so it copies a surviving
        rollout actor's weights instead (peer → object store → new actor); with no survivor the weights are gone
        and :class:`RolloutWeightsLost` sends the run back to its checkpoint."""
        timeout = self.cfg.sync.timeout_s + 600.0
        if not overlapping:
            return self.rollouts.replace(slot, cause, weights=learners.state_dict_ref, weights_timeout_s=timeout)
        peers = self.rollouts.alive_peers(slot)
        worker = self.rollouts.replace(slot, cause)
        for i in peers:
            try:   # queued behind the peer's current shard (its weights do not change before the sync)
                self.rollouts.load_from_peer(slot, i, timeout)
            except Exception as exc:
                if not is_actor_death(exc):
                    raise
                log.warning("rollout actor %d cannot lend its weights (%s)", i, classify(exc))
                continue
            log.warning("rollout actor %d took rollout actor %d's weights (overlapped rollout)", slot, i)
            return worker
        raise RolloutWeightsLost(f"rollout actor {slot} died during an overlapped rollout and no other rollout actor "
                                 f"holds the weights it ran with; going back to the last checkpoint")

    def sync(self, learners: Any, attempts: int = 3) -> float:
        """Broadcast the learner's weights to the rollout actors; rollout actors that died (before or during the
        sync) are replaced and the sync repeated, without touching the learner. A failure with every rollout actor
        alive, or with a dead learner rank, propagates: the caller rebuilds the learner group."""
        for attempt in range(attempts):
            try:
                return learners.sync_weights(self.rollouts.workers)
            except Exception as exc:
                dead = self.rollouts.dead_slots(settle_s=3.0)
                if not dead and not learners.dead_ranks(settle_s=0.0):
                    # a lost node: its actors stay ALIVE in the GCS until the node's death is detected
                    dead = self.rollouts.unreachable_slots(timeout_s=self.cfg.sync.timeout_s)
                if not dead or attempt == attempts - 1:
                    raise
                log.warning("weight sync failed (%s) because rollout actor(s) %s died; replacing them, learner kept",
                            classify(exc) or type(exc).__name__, dead)
                for slot in dead:
                    self.rollouts.replace(slot, exc)   # the repeated sync gives them the weights
        raise AssertionError("unreachable")

    # -- the recovery loop ---------------------------------------------------------------------------------------
    def recover(self, learners: Any, error: BaseException) -> tuple[Any, Any]:
        """Bring every role back after ``error``: returns ``(new learner group, restored state)``. Each pass tears
        the learner group down, builds a new one, restores the newest intact checkpoint into it, replaces every
        dead rollout actor and re-syncs. A pass that fails with another role failure counts as another rebuild."""
        while True:
            self.learner_rebuilds += 1
            limit = self.cfg.run.max_learner_restarts
            if self.learner_rebuilds > limit:
                raise LearnerRecoveryFailed(f"learner group failed {self.learner_rebuilds} times "
                                            f"(run.max_learner_restarts={limit}); last error: "
                                            f"{classify(error) or error}") from error
            try:
                return self._pass(learners, error, limit)
            except (LearnerRecoveryFailed, RolloutRecoveryFailed):
                raise
            except Exception as exc:
                if not (isinstance(exc, LEARNER_FAILURES) or is_actor_death(exc)):
                    raise
                error = exc
                learners = self._building or learners   # the next pass tears the half-built group down

    def _pass(self, learners: Any, error: BaseException, limit: int) -> tuple[Any, Any]:
        dead_ranks = learners.dead_ranks(settle_s=0.0)
        dead_slots = self.rollouts.dead_slots(settle_s=0.0)
        recorded = [learners.death_of(r) for r in dead_ranks] + [self.rollouts.death_of(s) for s in dead_slots]
        cause = next((c for c in recorded if c is not None), None) or classify(error)   # the GCS's is the precise one
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.error("run failed (%s; learner ranks dead: %s, rollout actors dead: %s): %s: %s; rebuilding the learner "
                  "group from the last checkpoint (rebuild %d/%d)", cause or "cause unknown", dead_ranks or "none",
                  dead_slots or "none", type(error).__name__, first[:200], self.learner_rebuilds, limit)
        try:
            learners.shutdown()
        except Exception as exc:   # the group is already broken; what matters is that its actors are gone
            log.warning("learner shutdown after failure: %s", exc)
        self._building = None
        new = self._building = self.make_learners()
        restored = self.restore(new)
        for slot in self.rollouts.dead_slots(settle_s=0.0):   # rollout actors lost in the same event
            self.rollouts.replace(slot, error)                   # the sync below gives them the weights
        self.sync(new)
        self._building = None
        log.warning("learner group rebuilt; continuing from step %d", restored.next_step)
        return new, restored
