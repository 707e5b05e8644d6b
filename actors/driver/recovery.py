"""Surviving actor deaths, by role (issue 16).

* **Which errors mean "an actor died"** lives here only: :data:`ACTOR_DEATH_ERRORS` / :func:`is_actor_death` cover a
  SIGKILLed or crashed process, Ray's out-of-memory kill, a lost node and a hung call (``GetTimeoutError``).
* **Rollout actors** hold no state but their weights. A dead one (at any phase: idle, generating, during the learner
  update or the weight sync) is replaced by a fresh actor that loads learner rank 0's current weights through the
  object store; the next sync re-forms the broadcast group with it. The learner group is not touched. Each actor
  slot may be replaced ``rollout.max_restarts`` times per run (Ray itself never restarts rollout actors: a restarted
  actor would hold the initial weights and occupy the slot's placement bundle). During an overlapped rollout
  (``run.overlap: one_step``) the learner is already updating, so the replacement copies a surviving rollout
  actor's weights instead (the weights the rollout runs with); with no survivor those weights are gone and the run
  rolls back to its last checkpoint like a learner failure (:class:`RolloutWeightsLost`), which keeps it exact.
* **Learner ranks** share collectives, so one dead rank leaves the others blocked until their (short) collective
  timeout. The controller never patches a single rank: it tears the whole group down, builds a new one, loads the
  newest complete checkpoint (or the seeded initial weights when there is none), re-syncs the rollout actors and
  re-runs the steps since — identical by design D7. ``metrics.jsonl`` is cut back only once the rebuild succeeded.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from actors.cluster.weight_sync import WeightSyncError
from actors.driver.checkpoint import read_checkpoint
from actors.driver.pending_rollout import load_pending
from actors.learner.group import LearnerTimeout

log = logging.getLogger(__name__)

ACTOR_DEATH_ERRORS = (RayActorError, OutOfMemoryError, WorkerCrashedError, NodeDiedError, GetTimeoutError)
"""Errors of a Ray call that mean its actor (or its process / node) is gone or hung: RayActorError (incl.
ActorDiedError, ActorUnavailableError), OutOfMemoryError (Ray's memory monitor), WorkerCrashedError, NodeDiedError,
GetTimeoutError."""



class RolloutWeightsLost(RuntimeError):
    """Every rollout actor holding the weights of an overlapped rollout died: the step cannot be reproduced from the
    learner (already updated), so the run goes back to its last checkpoint."""


LEARNER_FAILURES = ACTOR_DEATH_ERRORS + (LearnerTimeout, WeightSyncError, RolloutWeightsLost)
"""Exceptions that mean the learner group (or its sync group) is broken, or the run must go back to its last
checkpoint: the group is rebuilt from there."""


class LearnerRecoveryFailed(RuntimeError):
    """The learner group kept failing after ``run.max_learner_restarts`` rebuilds."""


class RolloutRecoveryFailed(RuntimeError):
    """A rollout actor slot died more than ``rollout.max_restarts`` times."""


def is_actor_death(exc: BaseException) -> bool:
    """True when ``exc`` is one of :data:`ACTOR_DEATH_ERRORS`, also when it reached us wrapped in a Ray task error
    (an actor method that itself called a dead actor). The service's own errors (e.g. ``RolloutLost``) are not
    deaths, whatever caused them."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ACTOR_DEATH_ERRORS):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ if isinstance(exc, RayTaskError) else None
    return False


def learner_failed(trainer, exc: BaseException) -> bool:
    """Whether ``exc`` (raised by a step) means the learner group is broken: a learner-side error type, an actor
    death, or any error while a learner rank is dead (e.g. gloo's "connection closed" when rank 0 died mid-sync)."""
    if isinstance(exc, LEARNER_FAILURES) or is_actor_death(exc):
        return True
    return bool(dead_actors(getattr(trainer.learners, "workers", []), settle_s=1.0))


def actor_state(handle) -> str:
    """The GCS's state of an actor: ALIVE, RESTARTING, DEAD, PENDING_CREATION, ... ('UNKNOWN' if not found)."""
    try:
        from ray._private.state import actors

        return str(actors(actor_id=handle._actor_id.hex()).get("State", "UNKNOWN"))
    except Exception as exc:   # the GCS query itself failed: say so, do not guess
        log.warning("could not read actor state from the GCS: %s", exc)
        return "UNKNOWN"


def dead_actors(handles, settle_s: float = 3.0) -> list[int]:
    """Indices of ``handles`` whose actor is DEAD. A kill shows up in the GCS within a moment of the error it
    causes, so this polls up to ``settle_s`` for the first death before answering "none"."""
    deadline = time.monotonic() + settle_s
    while True:
        dead = [i for i, h in enumerate(handles) if actor_state(h) == "DEAD"]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.25)


def unreachable_actors(handles, timeout_s: float) -> list[int]:
    """Indices of rollout actors that do not answer ``ready()`` within ``timeout_s`` (dead, on a lost node, or
    hung): replacing them is safe, they hold nothing but weights."""
    refs = [h.ready.remote() for h in handles]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    bad = []
    for i, ref in enumerate(refs):
        try:
            if ref not in done:
                raise GetTimeoutError(f"no answer within {timeout_s:.0f}s")
            ray.get(ref, timeout=0)
        except Exception as exc:
            log.warning("rollout actor %d is unreachable (%s)", i, type(exc).__name__)
            bad.append(i)
    return bad


# -------------------------------------------------------------------------------------------------- rollout side
def replace_rollout(trainer, slot: int, load_weights: bool = True):
    """A fresh rollout actor in ``slot`` for a dead (or hung) one; with ``load_weights`` it first loads learner rank
    0's current weights (so it can generate before the next sync). Counts against ``rollout.max_restarts``."""
    restarts = trainer.rollout_restarts
    restarts[slot] = restarts.get(slot, 0) + 1
    limit = trainer.cfg.rollout.max_restarts
    if restarts[slot] > limit:
        raise RolloutRecoveryFailed(f"rollout actor {slot} died {restarts[slot]} times "
                                    f"(rollout.max_restarts={limit}); stopping the run")
    log.warning("replacing rollout actor %d (restart %d/%d)", slot, restarts[slot], limit)
    try:
        ray.kill(trainer.workers[slot], no_restart=True)   # a hung actor is stopped, a dead one is a no-op
    except Exception:
        pass
    for attempt in range(1, 4):   # after a lost node, its placement bundle is re-placed a moment later
        worker = trainer._make_worker(slot)
        try:
            ray.get(worker.ready.remote(), timeout=trainer.cfg.placement.ready_timeout_s + 600.0)
            break
        except RayActorError as exc:   # died while starting; a timeout (no room) is not retried
            if attempt == 3:
                raise
            log.warning("replacement rollout actor %d died while starting (%s); trying again", slot,
                        type(exc).__name__)
            time.sleep(2.0 * attempt)
    if load_weights:
        state = ray.put(trainer.learners.state_dict_rank0())
        ray.get(worker.load_weights.remote(state), timeout=trainer.cfg.sync.timeout_s + 60.0)
    trainer.workers[slot] = worker
    trainer.dispatcher.actors[slot] = worker
    return worker


def replace_rollout_from_peer(trainer, slot: int):
    """A fresh rollout actor in ``slot`` holding the weights of a surviving rollout actor (an overlapped rollout:
    learner rank 0 is mid-update and no longer has the weights the rollout runs with). Raises
    :class:`RolloutWeightsLost` when no other rollout actor is alive."""
    peers = [i for i, w in enumerate(trainer.workers) if i != slot and actor_state(w) == "ALIVE"]
    worker = replace_rollout(trainer, slot, load_weights=False)
    for i in peers:
        try:   # queued behind the peer's current shard (its weights do not change before the sync); the weights go
            # from the peer to the new actor through the object store, not through the driver
            ray.get(worker.load_weights.remote(trainer.workers[i].state_dict.remote()),
                    timeout=trainer.cfg.sync.timeout_s + 600.0)
        except Exception as exc:
            if not is_actor_death(exc):
                raise
            log.warning("rollout actor %d cannot lend its weights (%s)", i, type(exc).__name__)
            continue
        log.warning("rollout actor %d took rollout actor %d's weights (overlapped rollout)", slot, i)
        return worker
    raise RolloutWeightsLost(f"rollout actor {slot} died during an overlapped rollout and no other rollout actor "
                             f"holds the weights it ran with; going back to the last checkpoint")


def sync_rollouts(trainer, attempts: int = 3) -> float:
    """Broadcast the learner's weights to the rollout actors; a rollout actor that died (before or during the
    sync) is replaced and the sync repeated, without touching the learner. A failure with every rollout actor
    alive (or a dead learner rank) propagates: the learner group is rebuilt by the caller."""
    for attempt in range(attempts):
        try:
            return trainer.learners.sync_weights(trainer.workers)
        except Exception as exc:
            dead = dead_actors(trainer.workers)
            if not dead and not dead_actors(trainer.learners.workers, settle_s=0.0):
                # a lost node: its actors stay ALIVE in the GCS until the node's death is detected
                dead = unreachable_actors(trainer.workers, timeout_s=trainer.cfg.sync.timeout_s)
            if not dead or attempt == attempts - 1:
                raise
            log.warning("weight sync failed (%s) because rollout actor(s) %s died; replacing them, learner kept",
                        type(exc).__name__, dead)
            for slot in dead:
                replace_rollout(trainer, slot)
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------------------- learner side
def rebuild_learners(trainer, error: BaseException) -> int:
    """Tear down ``trainer.learners``, rebuild it from the last checkpoint; returns the step to continue from.

    A rebuild that fails again counts as another restart and is retried until ``run.max_learner_restarts``; run
    state on disk (``metrics.jsonl``) is cut back to the checkpoint only after a rebuild succeeded."""
    while True:
        trainer.learner_restarts += 1
        limit = trainer.cfg.run.max_learner_restarts
        if trainer.learner_restarts > limit:
            raise LearnerRecoveryFailed(f"learner group failed {trainer.learner_restarts} times "
                                        f"(run.max_learner_restarts={limit}); last error: {error}") from error
        try:
            return _rebuild_once(trainer, error, limit)
        except (LearnerRecoveryFailed, RolloutRecoveryFailed):
            raise
        except Exception as exc:
            if not learner_failed(trainer, exc):
                raise
            error = exc


def _rebuild_once(trainer, error: BaseException, limit: int) -> int:
    from actors.learner.group import LearnerGroup

    latest = trainer.ckpt.latest(warn=True)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    log.error("learner group failed (%s: %s); tearing it down and rebuilding it from %s (restart %d/%d)",
              type(error).__name__, first, latest or "the initial weights", trainer.learner_restarts, limit)
    try:
        trainer.learners.shutdown()
    except Exception as exc:  # the group is already broken; what matters is that its actors are gone
        log.warning("learner shutdown after failure: %s", exc)
    trainer.learners = LearnerGroup(trainer.cfg, trainer.placement)
    dsog = type(trainer.dsog)(trainer.cfg.dsog)
    next_step, pending = 0, None
    if latest is not None:
        state, _ = read_checkpoint(latest)
        trainer.learners.load_checkpoint(str(latest / "learner"))
        dsog.load_state_dict(state["dsog"])
        next_step = int(state["next_step"])
        pending = load_pending(latest, next_step)
    for slot in dead_actors(trainer.workers, settle_s=0.0):   # rollout actors lost in the same failure
        replace_rollout(trainer, slot, load_weights=False)     # the sync below gives them the weights
    sync_rollouts(trainer)
    # recovery succeeded: only now is run state changed
    trainer.dsog = dsog
    trainer.pending = pending
    trainer.metrics.start_at(next_step)
    trainer.history = [m for m in trainer.history if m["step"] < next_step]
    log.warning("learner group rebuilt; continuing from step %d", next_step)
    return next_step
