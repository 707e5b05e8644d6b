"""The rollout role: owns its actors, reports its health, replaces the dead ones.

A rollout actor holds nothing but its weights, so a dead one (SIGKILL, crash, Ray's memory monitor, a lost node) is
replaced by a fresh actor in the same slot (placement bundle), loaded with weights from wherever they still exist:
learner rank 0's current weights, a surviving rollout actor's (an overlapped rollout), or none (the next sync brings
them). Rules that keep a replacement from ever hanging the run:

* a replacement is **recorded in its slot before it is awaited**, so a failure that cuts in while it starts finds it
  there: the next replacement kills it first and its placement bundle is free again;
* ``rollout.max_restarts`` counts **deaths** (each dead actor once, however many tries its replacement took);
* every wait is bounded and says, every ``PROGRESS_S`` seconds, what it waits for.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.cluster.deaths import Death, actor_states, classify, dead_actors, gcs_death

log = logging.getLogger(__name__)

PROGRESS_S = 30.0
"""A wait longer than this logs a line saying what it waits for, and again every this many seconds."""


class RolloutRecoveryFailed(RuntimeError):
    """A rollout actor slot died more than ``rollout.max_restarts`` times."""


def wait_logged(ref, timeout_s: float, what: str) -> Any:
    """``ray.get(ref)`` bounded by ``timeout_s``, logging ``what`` it waits for every :data:`PROGRESS_S` seconds;
    raises ``GetTimeoutError`` naming it at the bound."""
    deadline = time.monotonic() + timeout_s
    waited = 0.0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GetTimeoutError(f"{what}: no answer within {timeout_s:.0f}s")
        try:
            return ray.get(ref, timeout=min(PROGRESS_S, left))
        except GetTimeoutError:
            waited += min(PROGRESS_S, left)
            if time.monotonic() < deadline:
                log.warning("still waiting for %s (%.0fs of at most %.0fs)", what, waited, timeout_s)


class RolloutPool:
    """The rollout actors of one run: ``workers[slot]`` is the live handle of each slot (the list object itself never
    changes, so a dispatcher holding it sees replacements)."""

    def __init__(self, make_actor: Callable[[int], Any], num_workers: int, max_restarts: int,
                 start_timeout_s: float):
        """``make_actor(slot)``: a new rollout actor for ``slot`` (its placement bundle and options)."""
        self.make_actor = make_actor
        self.max_restarts = int(max_restarts)
        self.start_timeout_s = float(start_timeout_s)
        self.workers: list = [make_actor(i) for i in range(num_workers)]
        self.deaths: dict[int, int] = {}
        """Slot → rollout actors that died in it (what ``rollout.max_restarts`` bounds)."""
        self._counted: set[str] = set()

    def wait_ready(self) -> None:
        """Block until every actor has built its policy (bounded, with progress lines)."""
        for i, w in enumerate(self.workers):
            wait_logged(w.ready.remote(), self.start_timeout_s, f"rollout actor {i} to start")

    # -- health ------------------------------------------------------------------------------------------------
    def dead_slots(self, settle_s: float = 0.0) -> list[int]:
        """Slots whose actor the GCS reports DEAD (polling up to ``settle_s`` for a death to show)."""
        return dead_actors(self.workers, settle_s=settle_s)

    def unreachable_slots(self, timeout_s: float) -> list[int]:
        """Slots whose actor does not answer ``ready()`` within ``timeout_s`` (dead, on a lost node, or hung)."""
        refs = [h.ready.remote() for h in self.workers]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        bad = []
        for i, ref in enumerate(refs):
            try:
                if ref not in done:
                    raise GetTimeoutError(f"no answer within {timeout_s:.0f}s")
                ray.get(ref, timeout=0)
            except Exception as exc:
                log.warning("rollout actor %d is unreachable (%s)", i, classify(exc) or type(exc).__name__)
                bad.append(i)
        return bad

    def death_of(self, slot: int) -> Death | None:
        """The cause the GCS recorded for the dead actor of ``slot`` (None: alive or unknown)."""
        return gcs_death(self.workers[slot])

    def alive_peers(self, slot: int) -> list[int]:
        """Other slots whose actor is ALIVE."""
        states = actor_states(self.workers)
        return [i for i, s in enumerate(states) if i != slot and s == "ALIVE"]

    # -- replace -----------------------------------------------------------------------------------------------
    def _count_death(self, slot: int, cause: Death | BaseException | None) -> None:
        old = self.workers[slot]
        key = old._actor_id.hex()
        if key in self._counted:
            return   # this actor's death is already counted (a second try of the same replacement)
        self._counted.add(key)
        self.deaths[slot] = self.deaths.get(slot, 0) + 1
        death = gcs_death(old) or (cause if isinstance(cause, Death) else classify(cause))
        if self.deaths[slot] > self.max_restarts:
            raise RolloutRecoveryFailed(f"rollout actor {slot} died {self.deaths[slot]} times "
                                        f"(rollout.max_restarts={self.max_restarts}; last cause: "
                                        f"{death or 'unknown'}); stopping the run")
        log.warning("rollout actor %d died (%s); replacing it (restart %d/%d)", slot, death or "cause unknown",
                    self.deaths[slot], self.max_restarts)

    def replace(self, slot: int, cause: Death | BaseException | None = None, weights: Callable[[], Any] | None = None,
                weights_timeout_s: float = 900.0):
        """A fresh actor in ``slot`` for its dead (or hung) one; ``weights()`` (if given) returns the parameters to
        load (an object ref or a dict) before it takes work. Counts the old actor's death once."""
        self._count_death(slot, cause)
        for attempt in range(1, 4):   # after a lost node, its placement bundle is re-placed a moment later
            try:
                ray.kill(self.workers[slot], no_restart=True)   # frees the bundle; a dead actor is a no-op
            except Exception:
                pass
            worker = self.make_actor(slot)
            self.workers[slot] = worker   # recorded before it is awaited: a later failure kills or reuses it
            try:
                wait_logged(worker.ready.remote(), self.start_timeout_s, f"replacement rollout actor {slot} to start")
                break
            except RayActorError as exc:   # died while starting; a timeout (no room) is not retried
                if attempt == 3:
                    raise
                log.warning("replacement rollout actor %d died while starting (%s); trying again", slot,
                            classify(exc) or type(exc).__name__)
                self._counted.add(worker._actor_id.hex())   # its own death is not a death of the slot's actor
                time.sleep(2.0 * attempt)
        if weights is not None:
            wait_logged(worker.load_weights.remote(weights()), weights_timeout_s,
                        f"replacement rollout actor {slot} to load its weights")
        return worker

    def load_from_peer(self, slot: int, peer: int, timeout_s: float) -> None:
        """Copy rollout actor ``peer``'s weights into ``slot``'s actor (peer → object store → actor, not through the
        driver)."""
        ref = self.workers[slot].load_weights.remote(self.workers[peer].state_dict.remote())
        wait_logged(ref, timeout_s, f"rollout actor {slot} to copy rollout actor {peer}'s weights")

    def shutdown(self) -> None:
        """Kill every rollout actor of the pool."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception as exc:
                log.warning("shutdown: killing a rollout actor failed: %s", exc)
