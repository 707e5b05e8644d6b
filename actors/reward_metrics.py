"""Per-expert reward-serving metrics for the Ray dashboard / Prometheus (``ray.util.metrics``).

Serve exports its own ``ray_serve_*`` series (request latency, ongoing requests, replicas, batch sizes); these add
the reward-specific ones, all tagged with ``expert``:

- ``reward_serve_latency_s`` (histogram, ``side`` = "replica" | "client"): time to score one request;
- ``reward_serve_queue_depth`` (gauge, per replica): requests the replica holds (waiting for a batch or scoring);
- ``reward_serve_samples_scored`` (counter): samples scored;
- ``reward_serve_failures`` (counter, ``kind``): bad requests, scoring errors, timeouts, dead replicas, drops;
- ``reward_serve_replicas`` (gauge): the replica target, set by deploy / scale / the client's refresh.

They reach ``/metrics`` about 10 s after being recorded (Ray's report interval). ``Counter.inc(0)`` raises in
Ray, so every increment goes through :func:`_inc`, which skips zero.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

_lock = threading.Lock()
_metrics: dict[str, object] = {}


def _metric(name: str):
    """Create each metric once per process (lazily: ``ray.util.metrics`` needs a connected Ray worker)."""
    with _lock:
        if name in _metrics:
            return _metrics[name]
        from ray.util import metrics as m

        if name == "latency":
            obj = m.Histogram("reward_serve_latency_s", description="Seconds to score one reward request.",
                              boundaries=LATENCY_BOUNDARIES, tag_keys=("expert", "side"))
        elif name == "queue":
            obj = m.Gauge("reward_serve_queue_depth", description="Requests held by a reward replica "
                          "(waiting for a batch or being scored).", tag_keys=("expert", "replica"))
        elif name == "scored":
            obj = m.Counter("reward_serve_samples_scored", description="Samples scored by a reward expert.",
                            tag_keys=("expert",))
        elif name == "failures":
            obj = m.Counter("reward_serve_failures", description="Failed reward requests by kind.",
                            tag_keys=("expert", "kind"))
        elif name == "replicas":
            obj = m.Gauge("reward_serve_replicas", description="Target replica count of a reward deployment.",
                          tag_keys=("expert",))
        else:  # pragma: no cover - programming error
            raise KeyError(name)
        _metrics[name] = obj
        return obj


def _safe(fn, *args, **kwargs) -> None:
    """Metrics must never break scoring: a failure to record is logged once per call site and ignored."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - metrics are best effort by design
        log.debug("reward metric not recorded: %s", exc)


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    if value > 0:  # Counter.inc(0) raises ValueError in Ray
        _safe(lambda: _metric(name).inc(value, tags=tags))


def observe_latency(expert: str, seconds: float, side: str) -> None:
    """Record one request's scoring latency (``side``: "replica" or "client")."""
    _safe(lambda: _metric("latency").observe(max(0.0, float(seconds)), tags={"expert": expert, "side": side}))


def set_queue_depth(expert: str, replica: str, depth: int) -> None:
    """Set the number of requests a replica currently holds."""
    _safe(lambda: _metric("queue").set(float(depth), tags={"expert": expert, "replica": replica}))


def count_scored(expert: str, samples: int) -> None:
    """Add ``samples`` scored samples (zero is skipped)."""
    _inc("scored", float(samples), {"expert": expert})


def count_failure(expert: str, kind: str, n: int = 1) -> None:
    """Add ``n`` failures of ``kind`` (bad_request, error, timeout, replica_died, dropped, ...)."""
    _inc("failures", float(n), {"expert": expert, "kind": kind})


def set_replicas(expert: str, replicas: int) -> None:
    """Set a deployment's replica target."""
    _safe(lambda: _metric("replicas").set(float(replicas), tags={"expert": expert}))


_UNEXPECTED = ("WORKER_DIED", "NODE_DIED")
"""ActorDiedErrorContext reasons that mean a replica died (not stopped by Serve / ray.kill)."""


class ReplicaDeathWatch:
    """Counts reward replicas of one run's applications that died unexpectedly (SIGKILL, crash, Ray's OOM kill, a
    lost node), read from the GCS actor table. Serve re-routes a request whose replica died before accepting it, so
    no client sees an error for it; this is where such a death is counted (``kind="replica_lost"`` in
    ``reward_serve_failures`` and the step's ``faults/reward_failures``). Replicas Serve stops itself (scale-down,
    failed health check, redeploy) end by ``ray.kill`` and are not counted."""

    def __init__(self, app_names: dict[str, str]):
        """``app_names``: expert → Serve application name."""
        self.prefixes = {f"ServeReplica:{app}:": expert for expert, app in app_names.items()}
        self.seen: set[str] = set()
        self.poll(record=False)   # deaths from before the run are not the run's

    def poll(self, record: bool = True) -> dict[str, int]:
        """Expert → replicas that died since the last poll (recorded as failures unless ``record`` is False)."""
        try:
            from ray._private.state import actors

            dead = actors(actor_state_name="DEAD")
        except Exception as exc:   # the GCS query failed: report nothing rather than guess
            log.debug("replica death watch: %s", exc)
            return {}
        found: dict[str, int] = {}
        for actor_id, info in dead.items():
            if actor_id in self.seen:
                continue
            expert = next((e for p, e in self.prefixes.items() if info.get("ActorClassName", "").startswith(p)),
                          None)
            if expert is None:
                continue
            self.seen.add(actor_id)
            if _died_unexpectedly(info.get("DeathCause")):
                found[expert] = found.get(expert, 0) + 1
        if record:
            for expert, n in found.items():
                count_failure(expert, "replica_lost", n)
                log.warning("reward expert %s: %d replica(s) died (counted as failures)", expert, n)
        return found


def _died_unexpectedly(cause) -> bool:
    if cause is None:
        return False
    if cause.HasField("oom_context"):
        return True
    if cause.HasField("actor_died_error_context"):
        ctx = cause.actor_died_error_context
        return type(ctx).Reason.Name(ctx.reason) in _UNEXPECTED
    return False
