"""Hands group requests to rollout actors and collects results, surviving dead actors.

Groups stream back as they finish (``ray.wait``). A request whose actor dies is re-dispatched to another (or the
restarted) actor; design D7 seeding makes the re-run produce the same samples, and each request id is accepted
exactly once, so nothing is scored twice or lost.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError

from actors.recovery import ACTOR_DEATH_ERRORS

log = logging.getLogger(__name__)


class RolloutLost(RuntimeError):
    """A group could not be produced even after re-dispatching."""


class GroupDispatcher:
    """Round-robin dispatch of requests over a list of actors with re-dispatch on actor death."""

    def __init__(self, actors: list, replace_actor: Callable[[int], object] | None = None,
                 max_redispatch: int = 3, timeout_s: float = 3600.0):
        self.actors = list(actors)
        self.replace_actor = replace_actor
        self.max_redispatch = max_redispatch
        self.timeout_s = timeout_s
        self.redispatched = 0
        """Total requests re-dispatched after an actor failure (a metric)."""

    def run(self, requests: list, on_result: Callable[[object], None] | None = None) -> list:
        """Produce every request's result, in request order. ``on_result`` sees each result as it arrives.

        A dead or hung (``timeout_s``) actor's group is re-dispatched; an exception raised inside ``generate_group``
        (e.g. a required reward expert that keeps failing) propagates with its cause."""
        queue = deque(enumerate(requests))
        results: dict[int, object] = {}
        tries = {i: 0 for i in range(len(requests))}
        idle = deque(range(len(self.actors)))
        inflight: dict = {}
        started: dict = {}
        while queue or inflight:
            while queue and idle:
                idx, req = queue.popleft()
                slot = idle.popleft()
                ref = self.actors[slot].generate_group.remote(req)
                inflight[ref] = (idx, slot)
                started[ref] = time.monotonic()
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            now = time.monotonic()
            for ref in list(inflight):
                if ref not in ready and now - started[ref] > self.timeout_s:
                    ready.append(ref)
            for ref in ready:
                idx, slot = inflight.pop(ref)
                started.pop(ref, None)
                try:
                    result = ray.get(ref, timeout=0)
                except ACTOR_DEATH_ERRORS as exc:
                    tries[idx] += 1
                    if tries[idx] > self.max_redispatch:
                        raise RolloutLost(f"group {idx} failed {tries[idx]} times; last error: {exc}") from exc
                    log.warning("rollout actor %d failed on group %d (%s); re-dispatching", slot, idx,
                                type(exc).__name__)
                    self.redispatched += 1
                    if isinstance(exc, GetTimeoutError):   # hung, not dead: stop it before replacing it
                        ray.kill(self.actors[slot], no_restart=True)
                    if self.replace_actor is not None:
                        self.actors[slot] = self.replace_actor(slot)
                    queue.appendleft((idx, requests[idx]))
                    idle.append(slot)
                    continue
                if idx not in results:
                    results[idx] = result
                    if on_result is not None:
                        on_result(result)
                idle.append(slot)
        return [results[i] for i in range(len(requests))]
