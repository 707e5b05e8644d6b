"""Which errors mean "an actor died" (actors/cluster/deaths.py): one list, used by the dispatcher and the controller."""
from __future__ import annotations

from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    NodeDiedError,
    OutOfMemoryError,
    RayTaskError,
    WorkerCrashedError,
)

from actors.driver.dispatch import RolloutLost
from actors.cluster.deaths import ACTOR_DEATH_ERRORS, is_actor_death


def test_every_ray_death_cause_counts_and_service_errors_do_not():
    for exc in (ActorDiedError(), ActorUnavailableError("gone", None), OutOfMemoryError("memory monitor"),
                WorkerCrashedError(), NodeDiedError("node"), GetTimeoutError("hung")):
        assert isinstance(exc, ACTOR_DEATH_ERRORS) and is_actor_death(exc), type(exc).__name__
    try:   # an actor method that called a dead actor: a task error caused by the death
        raise RayTaskError("f", "traceback", OutOfMemoryError("oom")) from OutOfMemoryError("oom")
    except RayTaskError as wrapped:
        assert is_actor_death(wrapped)
    try:   # the service's own error after too many re-dispatches is not itself a death
        raise RolloutLost("group 0 failed 4 times") from ActorDiedError()
    except RolloutLost as lost:
        assert not is_actor_death(lost)
    assert not is_actor_death(ValueError("bad input"))
