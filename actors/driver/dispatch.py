"""Hands rollout work to the rollout actors and collects it, surviving dead actors (sample-level dispatch).

A step's groups are split into *shards* of ``rollout.samples_per_request`` consecutive samples
(:func:`shard_group`); a shard carries its samples' DSOG redraws with it. All shards of all the step's groups go
into one queue and every idle rollout actor pulls the next one, so the work spreads over every actor and an actor
held up by slow samples or many redraws simply takes fewer shards (dynamic load balancing; nothing is assigned to
an actor ahead of time). Finished shards are assembled into one :class:`~actors.rollout.engine.GroupResult` per
group (``assemble_group``), in sample order whatever order they arrived in.

Determinism (D7): a shard's samples depend only on (seed, step, prompt, sample, attempt) and on the shard's
composition, and the composition depends only on G and ``samples_per_request``, never on the number of actors:
samples, rewards and losses are bit-identical for 1, 2, 3, ... actors (with the screening expert scoring each
request alone, ``serve.<expert>.max_batch_size: 1``, since a Serve batch merging two actors' requests may change
a score's last bits).

DSOG: a group whose threshold is not known yet (the run's first step) and that is split into several shards gets
a calibration pass first: every shard screens its samples' first attempt (``screen_only``), the threshold is the
(1 − TPR) quantile of the whole group's first-attempt scores (exactly today's D6 initialisation), then the shards
run with it. The threshold, pass rate and forced keeps therefore mean what they mean for an unsplit group.

Faults: a shard whose actor dies (or hangs past ``timeout_s``) is re-queued at the front for another or the
replacement actor; each shard is accepted exactly once, so nothing is scored twice or lost.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError

from actors.cluster.deaths import ACTOR_DEATH_ERRORS, classify
from actors.rollout.engine import GroupRequest, GroupResult, SampleRequest, assemble_group

log = logging.getLogger(__name__)

class RolloutLost(RuntimeError):
    """A shard could not be produced even after re-dispatching."""


def shard_group(req: GroupRequest, group_size: int, per_request: int, screen_only: bool = False
                ) -> list[SampleRequest]:
    """The shards of one group: consecutive runs of ``per_request`` sample indices (0 = one shard of all G)."""
    if group_size < 1 or per_request < 0:
        raise ValueError(f"shard_group: group_size must be >= 1 and per_request >= 0, got {group_size}, "
                         f"{per_request}")
    size = group_size if per_request == 0 else min(per_request, group_size)
    return [SampleRequest(step=req.step, prompt_index=req.prompt_index, concept=req.concept,
                          threshold=req.threshold, samples=tuple(range(lo, min(lo + size, group_size))),
                          screen_only=screen_only)
            for lo in range(0, group_size, size)]


class TaskPool:
    """Pull-based execution of independent tasks on a list of actors, with re-dispatch on actor death.

    Each actor runs up to ``per_actor`` tasks at once (1 for the lock-step engine; the continuous engine batches
    the shards it holds); an actor with room takes the next queued task. The tasks of an actor that failed
    (:data:`actors.cluster.deaths.ACTOR_DEATH_ERRORS`: dead, OOM-killed, crashed, node lost or hung) go back to the
    front of the queue and the actor is replaced (``replace_actor(slot, error)``) once. ``actors`` is used as given
    (not copied): a replacement made elsewhere in the same list is seen at once."""

    def __init__(self, actors: list, replace_actor: Callable[[int, BaseException], object] | None = None,
                 max_redispatch: int = 3, timeout_s: float = 3600.0, per_actor: int = 1):
        if per_actor < 1:
            raise ValueError(f"TaskPool: per_actor must be >= 1, got {per_actor}")
        self.actors = actors
        self.replace_actor = replace_actor
        self.max_redispatch = max_redispatch
        self.timeout_s = timeout_s
        self.per_actor = int(per_actor)
        self.redispatched = 0
        """Total tasks (shards) re-dispatched after an actor failure (a metric)."""

    def run_tasks(self, method: str, tasks: list, on_result: Callable[[int, object], None] | None = None) -> list:
        """Every task's result of ``actor.<method>(task)``, in task order; ``on_result(index, result)`` sees each
        as it arrives. A dead or hung actor's tasks are re-dispatched; an exception raised inside the method (e.g.
        a required reward expert that keeps failing) propagates with its cause."""
        queue = deque(enumerate(tasks))
        results: dict[int, object] = {}
        tries = {i: 0 for i in range(len(tasks))}
        load = [0] * len(self.actors)
        generation = [0] * len(self.actors)   # bumped when a slot's actor is replaced: its old calls are void
        inflight: dict = {}
        started: dict = {}
        while queue or inflight:
            while queue:   # one task at a time to the least-loaded actor: spread evenly, up to per_actor each
                slot = min(range(len(self.actors)), key=lambda s: load[s])
                if load[slot] >= self.per_actor:
                    break
                idx, task = queue.popleft()
                ref = getattr(self.actors[slot], method).remote(task)
                inflight[ref] = (idx, slot, generation[slot])
                started[ref] = time.monotonic()
                load[slot] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            now = time.monotonic()
            for ref in list(inflight):
                if ref not in ready and now - started[ref] > self.timeout_s:
                    ready.append(ref)
            for ref in ready:
                if ref not in inflight:
                    continue   # voided above: its actor was replaced
                idx, slot, gen = inflight.pop(ref)
                started.pop(ref, None)
                load[slot] -= 1
                try:
                    result = ray.get(ref, timeout=0)
                except ACTOR_DEATH_ERRORS as exc:
                    if gen == generation[slot]:   # first failure seen of this actor: re-queue all its calls
                        lost = [(r, i) for r, (i, s, g) in inflight.items() if s == slot and g == gen]
                        for r, _ in lost:
                            inflight.pop(r)
                            started.pop(r, None)
                        load[slot] = 0
                        requeue = sorted([idx] + [i for _, i in lost])
                        for i in requeue:
                            self._count_try(i, exc, tries)
                        queue.extendleft((i, tasks[i]) for i in reversed(requeue))
                        generation[slot] += 1
                        self._replace(slot, idx, exc)
                    continue
                if idx not in results:
                    results[idx] = result
                    if on_result is not None:
                        on_result(idx, result)
        return [results[i] for i in range(len(tasks))]

    def _count_try(self, idx: int, exc: Exception, tries: dict) -> None:
        """Count a failed try of task ``idx``; raise RolloutLost past ``max_redispatch``."""
        tries[idx] += 1
        if tries[idx] > self.max_redispatch:
            raise RolloutLost(f"rollout task {idx} failed {tries[idx]} times; last error: {exc}") from exc
        self.redispatched += 1

    def _replace(self, slot: int, idx: int, exc: Exception) -> None:
        """Stop a hung actor, replace it (its tasks are already re-queued)."""
        log.warning("rollout actor %d failed on task %d (%s); re-dispatching its tasks", slot, idx,
                    classify(exc) or type(exc).__name__)
        if isinstance(exc, GetTimeoutError):   # hung, not dead: stop it before replacing it
            ray.kill(self.actors[slot], no_restart=True)
        if self.replace_actor is not None:
            self.actors[slot] = self.replace_actor(slot, exc)


class GroupDispatcher(TaskPool):
    """Produces a step's groups by spreading their samples over all rollout actors (see the module docstring).

    ``group_size``: G; ``samples_per_request``: shard size (0 = whole group per request, the pre-sharding
    behaviour); ``dsog``: the DSOGConfig (its ``enabled`` / ``initial_threshold`` decide whether a split group needs
    the calibration pass)."""

    def __init__(self, actors: list, replace_actor: Callable[[int, BaseException], object] | None = None,
                 max_redispatch: int = 3, timeout_s: float = 3600.0, *, group_size: int,
                 samples_per_request: int = 1, dsog, per_actor: int = 1):
        super().__init__(actors, replace_actor, max_redispatch, timeout_s, per_actor)
        self.group_size = int(group_size)
        self.samples_per_request = int(samples_per_request)
        self.dsog = dsog

    def run(self, requests: list[GroupRequest],
            on_shard: Callable[[object], None] | None = None) -> list[GroupResult]:
        """Every request's GroupResult, in request order. ``on_shard`` sees each finished shard (SampleResult)
        as it arrives (not the calibration pass's)."""
        from rl.grpo.dsog import DSOGController

        g, per = self.group_size, self.samples_per_request
        init: dict[int, float] = {}
        calibrate = [i for i, r in enumerate(requests) if r.threshold is None and self._needs_calibration()]
        if calibrate:
            tasks = [(i, sh) for i in calibrate for sh in shard_group(requests[i], g, per, screen_only=True)]
            outs = self.run_tasks("generate_samples", [sh for _, sh in tasks])
            for i in calibrate:
                scores = [x for (j, _), o in zip(tasks, outs) if j == i for x in o.first_scores]
                init[i] = DSOGController.initial_threshold(scores, self.dsog)
        run_reqs = [dataclasses.replace(r, threshold=init[i]) if i in init else r for i, r in enumerate(requests)]
        tasks = [(i, sh) for i, r in enumerate(run_reqs) for sh in shard_group(r, g, per)]
        outs = self.run_tasks("generate_samples", [sh for _, sh in tasks],
                              on_result=None if on_shard is None else (lambda _i, res: on_shard(res)))
        results = []
        for i, req in enumerate(requests):
            res = assemble_group(req, [o for (j, _), o in zip(tasks, outs) if j == i])
            if i in init:
                res.init_threshold = init[i]
            results.append(res)
        return results

    def _needs_calibration(self) -> bool:
        """A split group without a threshold must calibrate on all its first attempts before any shard decides."""
        d = self.dsog
        split = 0 < self.samples_per_request < self.group_size
        return split and d.enabled and d.initial_threshold is None
