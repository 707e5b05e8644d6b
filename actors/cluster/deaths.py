"""Did an actor die, and why? The one place that answers it (issue 23).

Every caller that must tell "the actor behind this call is gone" from "the call failed" uses :func:`classify`: the
reward client (a replica died → retry), the rollout dispatcher (a rollout actor died → re-dispatch its shard) and the
run supervisor (which role to replace or rebuild). It works on exception *types* and walks the ``RayTaskError``
cause chain (an actor method that itself called a dead actor); the message is read only to name the cause Ray gives
(out of memory with the node's figures, a lost node, a crash) in the log.

:func:`actor_states` reads the GCS actor table: Ray's public state API (``ray.util.state``) needs the dashboard,
which a private training cluster does not run, so this uses ``ray._private.state`` — the one such use, here.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

log = logging.getLogger(__name__)

ACTOR_DEATH_ERRORS = (RayActorError, OutOfMemoryError, WorkerCrashedError, NodeDiedError, GetTimeoutError)
"""Errors of a Ray call that mean its actor (or its process / node) is gone or hung: RayActorError (incl.
ActorDiedError, ActorUnavailableError), OutOfMemoryError (Ray's memory monitor), WorkerCrashedError, NodeDiedError,
GetTimeoutError."""

_OOM_TEXT = re.compile(r"running low on memory|memory pressure \(OOM\)|OOM kill reason|memory monitor")
"""What Ray's memory monitor writes (a SIGKILL's generic text mentions "the OOM killer" too, so not that)."""
_MEMORY_FIGURES = re.compile(r"Memory on the node \(IP: ([^,]+), ID: [0-9a-f]+\) was ([0-9.]+)GB used / "
                             r"([0-9.]+)GB limit \(([0-9.]+)\)")
_NODE_TEXT = re.compile(r"node .*(died|dead|removed|lost)|NodeDiedError|raylet .*died", re.I)


@dataclass(frozen=True)
class Death:
    """Why an actor call failed because its actor is gone: ``cause`` is one of "out_of_memory", "node_lost",
    "crashed" (process died: SIGKILL, segfault, exit), "hung" (no answer in time); ``detail`` is one line for the
    log (for out-of-memory, the node's memory figures Ray reported)."""

    cause: str
    detail: str

    def __str__(self) -> str:
        return f"{self.cause} ({self.detail})" if self.detail else self.cause


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if isinstance(exc, RayTaskError) else None


def _memory_detail(text: str) -> str:
    m = _MEMORY_FIGURES.search(text)
    if not m:
        return "killed by Ray's memory monitor"
    ip, used, limit, frac = m.groups()
    return f"killed by Ray's memory monitor: node {ip} used {used} GB of a {limit} GB limit ({float(frac):.0%})"


def classify(exc: BaseException | None) -> Death | None:
    """The :class:`Death` behind ``exc``, or None when ``exc`` does not mean an actor is gone. The service's own
    errors (e.g. ``RolloutLost``) are not deaths, whatever caused them."""
    for e in _chain(exc):
        if not isinstance(e, ACTOR_DEATH_ERRORS):
            continue
        text = str(e)
        if isinstance(e, OutOfMemoryError) or _OOM_TEXT.search(text):
            return Death("out_of_memory", _memory_detail(text))
        if isinstance(e, NodeDiedError) or _NODE_TEXT.search(text):
            return Death("node_lost", _first_line(text))
        if isinstance(e, GetTimeoutError):
            return Death("hung", _first_line(text))
        return Death("crashed", _first_line(text))
    return None


def is_actor_death(exc: BaseException | None) -> bool:
    """True when ``exc`` (or the Ray task error it came wrapped in) means its actor is gone or hung."""
    return classify(exc) is not None


_EXIT_DETAIL = re.compile(r"Worker exit detail: (.*?)(?:\. |\.$|$)", re.M)


def _first_line(text: str) -> str:
    """One short sentence of Ray's error text: the worker's exit detail when Ray gives one, else its last line."""
    m = _EXIT_DETAIL.search(text)
    if m:
        return m.group(1).strip()[:200]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("class_name:", "actor_id:", "pid:", "namespace:", "name:", "ip:"))]
    return (useful[-1] if useful else "").split(". ")[0][:200]


# -------------------------------------------------------------------------------------------------- the GCS's view
def _actor_table(**query) -> dict:
    """The GCS actor table (``ray._private.state.actors``): the one private call of this module (see its docstring:
    no public API without the dashboard)."""
    from ray._private.state import actors

    return actors(**query)


def actor_states(handles) -> list[str]:
    """The GCS's state of each actor: ALIVE, RESTARTING, DEAD, PENDING_CREATION, ... ('UNKNOWN' if not found or the
    query failed; a failed query is logged, never guessed)."""
    try:
        return [str(_actor_table(actor_id=h._actor_id.hex()).get("State", "UNKNOWN")) for h in handles]
    except Exception as exc:
        log.warning("could not read actor states from the GCS: %s", exc)
        return ["UNKNOWN"] * len(handles)


def dead_actor_table() -> dict[str, dict]:
    """Every DEAD actor the GCS knows: actor id → its table entry (``ActorClassName``, ``DeathCause``, ...)."""
    return _actor_table(actor_state_name="DEAD")


def gcs_death(handle) -> Death | None:
    """The death cause the GCS recorded for a DEAD actor (out of memory with the node's figures, a lost node, a
    crash), or None when it is not dead or the cause is unknown."""
    try:
        info = _actor_table(actor_id=handle._actor_id.hex())
    except Exception:
        return None
    if str(info.get("State")) != "DEAD":
        return None
    return death_from_cause(info.get("DeathCause"))


def death_from_cause(cause) -> Death | None:
    """A :class:`Death` from the GCS's ``ActorDeathCause`` message (None: stopped on purpose or unknown)."""
    if cause is None:
        return None
    if cause.HasField("oom_context"):
        return Death("out_of_memory", _memory_detail(cause.oom_context.error_message))
    if cause.HasField("actor_died_error_context"):
        ctx = cause.actor_died_error_context
        reason = type(ctx).Reason.Name(ctx.reason)
        if reason == "NODE_DIED":
            return Death("node_lost", _first_line(ctx.error_message))
        if reason == "WORKER_DIED":
            text = ctx.error_message
            return (Death("out_of_memory", _memory_detail(text)) if _OOM_TEXT.search(text)
                    else Death("crashed", _first_line(text)))
    return None


def died_unexpectedly(cause) -> bool:
    """Whether a GCS ``ActorDeathCause`` means the actor died (OOM kill, crash, lost node) rather than being stopped
    (``ray.kill``, Serve scaling it down, its owner exiting)."""
    return death_from_cause(cause) is not None


def dead_actors(handles, settle_s: float = 3.0) -> list[int]:
    """Indices of ``handles`` whose actor is DEAD. A kill shows up in the GCS within a moment of the error it
    causes, so this polls up to ``settle_s`` for the first death before answering "none"."""
    deadline = time.monotonic() + settle_s
    while True:
        dead = [i for i, s in enumerate(actor_states(handles)) if s == "DEAD"]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.25)
