"""The one checkpoint restore, used by ``--resume`` and by every learner rebuild (issue 23).

:func:`restore_run_state` takes the checkpoints to try, newest first, and for each one in turn

1. verifies every file against ``MANIFEST.json`` (sizes and SHA-256 content hashes, :func:`checkpoint.damage`);
2. reads every driver-side part: ``state.json`` (next step, DSOG controller state, counters), ``config.yaml``,
   ``rng.json`` (checked by applying it to private generators), the stored next-step rollout
   (``next_rollout.pkl``, ``run.overlap: one_step``) and, with ``make_dsog``, loads the DSOG state into a fresh
   controller;
3. loads the learner state (DeepSpeed weights + optimizer) through ``learners.load_checkpoint``.

The first checkpoint whose parts all load is returned as a :class:`RunState`, which the caller applies
(:meth:`actors.driver.trainer.Trainer.rewind`). A checkpoint that fails any step is skipped with a warning naming the
file, and the next older one is tried; with ``explicit`` (``--resume PATH``) the first failure is raised instead.
A learner rank that dies or hangs during the load is not a checkpoint problem: that error propagates unchanged, for
the supervisor to handle.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from actors.driver.checkpoint import (
    RNG_FILE,
    STATE_FILE,
    CheckpointError,
    check_rng_state,
    damage,
    one_line,
    read_checkpoint,
)
from actors.driver.pending_rollout import PendingRollout, load_pending

log = logging.getLogger(__name__)

__all__ = ["RunState", "load_parts", "restore_run_state"]


@dataclass
class RunState:
    """What a run continues from after a resume or a learner rebuild (see :meth:`Trainer.rewind`)."""

    next_step: int
    """The step to run next (= steps done)."""
    dsog: dict | None = None
    """The DSOG controller's state (None = a fresh controller)."""
    pending: PendingRollout | None = None
    """``run.overlap: one_step``: the stored finished rollout of ``next_step``."""
    redispatched: int = 0
    """Re-dispatched shards so far (a counter that continues)."""
    rng: dict | None = None
    """The driver's RNG states (``rng.json``)."""
    path: Path | None = None
    """The checkpoint it came from (None = the initial weights)."""
    state: dict | None = None
    """The checkpoint's whole ``state.json`` (None = the initial weights)."""
    config: dict | None = None
    """The config the checkpoint was written with (``config.yaml``; None = the initial weights)."""


def _not_a_checkpoint_problem(exc: BaseException) -> bool:
    """A dead or hung learner rank (actor death, time-out): the supervisor's business, not the checkpoint's."""
    if isinstance(exc, TimeoutError):
        return True
    try:
        from actors.cluster.deaths import is_actor_death
    except ImportError:   # pragma: no cover - Ray missing
        return False
    return is_actor_death(exc)


def load_parts(path: Path, learners: Any, make_dsog: Callable[[], Any] | None = None) -> RunState:
    """Verify checkpoint ``path`` and load every part of it (module docstring, steps 1-3); CheckpointError naming the
    file that failed."""
    path = Path(path)
    why = damage(path, verify=True)
    if why is not None:
        raise CheckpointError(why)
    state, config = read_checkpoint(path)
    try:
        next_step = int(state["next_step"])
        dsog = state.get("dsog")
        redispatched = int(state.get("counters", {}).get("redispatched_groups", 0))
        if make_dsog is not None and dsog is not None:
            make_dsog().load_state_dict(dsog)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: {path / STATE_FILE} does not hold a usable run state "
                              f"({one_line(exc)})") from exc
    rng = None
    if (path / RNG_FILE).exists():
        try:
            rng = json.loads((path / RNG_FILE).read_text())
            check_rng_state(rng)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path}: {path / RNG_FILE} is unreadable ({one_line(exc)})") from exc
    pending = load_pending(path, next_step)
    learner_dir = path / "learner"
    try:
        learners.load_checkpoint(str(learner_dir))
    except Exception as exc:
        if _not_a_checkpoint_problem(exc):
            raise
        cause = getattr(exc, "cause", None) or exc   # a RayTaskError's original error
        raise CheckpointError(f"checkpoint {path}: loading the learner state from {learner_dir} failed "
                              f"({one_line(cause)})") from exc
    return RunState(next_step=next_step, dsog=dsog, pending=pending, redispatched=redispatched, rng=rng, path=path,
                    state=state, config=config)


def restore_run_state(candidates: Iterable[Path], learners: Any, explicit: bool = False,
                      make_dsog: Callable[[], Any] | None = None) -> RunState:
    """The run state of the newest checkpoint in ``candidates`` (newest first) that verifies and loads completely,
    its learner state loaded into ``learners`` (module docstring). No candidates: step 0 with the learners' initial
    weights. A failing candidate is warned about (naming the file) and the next is tried; ``explicit``: raised.
    CheckpointError when every candidate fails."""
    candidates = list(candidates)
    failures: list[str] = []
    for i, path in enumerate(candidates):
        try:
            return load_parts(path, learners, make_dsog)
        except CheckpointError as exc:
            if explicit:
                raise
            failures.append(str(exc))
            log.warning("%s; %s", exc, "falling back to an older checkpoint" if i + 1 < len(candidates)
                        else "no older checkpoint left")
    if failures:
        raise CheckpointError(f"no checkpoint could be loaded ({len(failures)} tried, newest first): "
                              + " | ".join(failures))
    return RunState(next_step=0)
