"""Per-expert reward-serving metrics for the Ray dashboard / Prometheus (``ray.util.metrics``).

Serve exports its own ``ray_serve_*`` series (request latency, ongoing requests, replicas, batch sizes); these add
the reward-specific ones, all labelled ``expert``, ``run`` (``$UNICTASK_RUN_NAME``, set by ``launch.train`` for every
process of the job) and ``ray_job_id`` (the Ray job id of the recording process; for the replicas, the job that
started Serve; not ``job``, which Prometheus owns: see ``actors.telemetry.prometheus``):

- ``reward_serve_latency_s`` (histogram, ``side`` = "replica" | "client"): time to score one request;
- ``reward_serve_queue_depth`` (gauge, per replica): requests the replica holds (waiting for a batch or scoring);
- ``reward_serve_samples_scored`` (counter): samples scored;
- ``reward_serve_failures`` (counter, ``kind``): bad requests, scoring errors, timeouts, dead replicas, drops;
- ``reward_serve_replicas`` (gauge): the replica target, set by deploy / scale / the client's refresh.

They reach ``/metrics`` about 10 s after being recorded (Ray's report interval). So that every series exists from
the first step: the failure counter of an expert is recorded at zero for every kind the first time the process
touches that expert (``Counter.inc(0)`` raises, so the zero goes through ``_record``), and a daemon thread re-reports
the last value of every gauge every ``prom_export.REFRESH_S`` seconds (Ray drops a gauge that is not re-reported
for two intervals). :func:`watch_replicas` keeps the replica gauge in step with the Serve controller.
"""
from __future__ import annotations

import logging
import threading

from actors.cluster.deaths import dead_actor_table, died_unexpectedly
from actors.telemetry.prometheus import LABELS, REFRESH_S, run_labels

log = logging.getLogger(__name__)

FAILURE_KINDS = ("bad_request", "error", "timeout", "replica_died", "replica_lost", "cancelled", "dropped")
"""Kinds of ``reward_serve_failures`` (each series exists at zero from the first use of an expert)."""

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

_lock = threading.Lock()
_metrics: dict[str, object] = {}
_labels: dict[str, str] = {}
_gauge_values: dict[tuple, float] = {}      # (metric name, frozen tags) -> last value, re-reported by the keeper
_touched: set[str] = set()                   # experts whose zero failure series this process has recorded
_keeper: threading.Thread | None = None
_stop = threading.Event()


def labels() -> dict[str, str]:
    """The ``run`` / ``ray_job_id`` labels of this process (resolved once)."""
    if not _labels:
        _labels.update(run_labels())
    return dict(_labels)


def _tags(**tags: str) -> dict[str, str]:
    return {**labels(), **tags}


def _metric(name: str):
    """Create each metric once per process (lazily: ``ray.util.metrics`` needs a connected Ray worker)."""
    with _lock:
        if name in _metrics:
            return _metrics[name]
        from ray.util import metrics as m

        if name == "latency":
            obj = m.Histogram("reward_serve_latency_s", description="Seconds to score one reward request.",
                              boundaries=LATENCY_BOUNDARIES, tag_keys=("expert", "side") + LABELS)
        elif name == "queue":
            obj = m.Gauge("reward_serve_queue_depth", description="Requests held by a reward replica "
                          "(waiting for a batch or being scored).", tag_keys=("expert", "replica") + LABELS)
        elif name == "scored":
            obj = m.Counter("reward_serve_samples_scored", description="Samples scored by a reward expert.",
                            tag_keys=("expert",) + LABELS)
        elif name == "failures":
            obj = m.Counter("reward_serve_failures", description="Failed reward requests by kind.",
                            tag_keys=("expert", "kind") + LABELS)
        elif name == "replicas":
            obj = m.Gauge("reward_serve_replicas", description="Running replicas of a reward deployment.",
                          tag_keys=("expert",) + LABELS)
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


def _touch(expert: str) -> None:
    """First use of ``expert`` in this process: its failure series exist at zero from now on."""
    if expert in _touched:
        return
    _touched.add(expert)
    for kind in FAILURE_KINDS:
        _safe(lambda k=kind: _metric("failures")._record(0.0, tags=_tags(expert=expert, kind=k)))
    _safe(lambda: _metric("scored")._record(0.0, tags=_tags(expert=expert)))


def _set_gauge(name: str, value: float, tags: dict[str, str]) -> None:
    _safe(lambda: _metric(name).set(float(value), tags=tags))
    with _lock:
        _gauge_values[(name, tuple(sorted(tags.items())))] = float(value)
    _ensure_keeper()


def _ensure_keeper() -> None:
    global _keeper
    with _lock:
        if _keeper is None:
            _keeper = threading.Thread(target=_keep_alive, name="reward-metrics", daemon=True)
            _keeper.start()


def _keep_alive() -> None:
    while not _stop.wait(REFRESH_S):
        with _lock:
            items = list(_gauge_values.items())
        for (name, tags), value in items:
            _safe(lambda n=name, t=dict(tags), v=value: _metric(n).set(v, tags=t))


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    if value > 0:  # Counter.inc(0) raises ValueError in Ray
        _safe(lambda: _metric(name).inc(value, tags=tags))


def observe_latency(expert: str, seconds: float, side: str) -> None:
    """Record one request's scoring latency (``side``: "replica" or "client")."""
    _touch(expert)
    _safe(lambda: _metric("latency").observe(max(0.0, float(seconds)), tags=_tags(expert=expert, side=side)))


def set_queue_depth(expert: str, replica: str, depth: int) -> None:
    """Set the number of requests a replica currently holds."""
    _set_gauge("queue", float(depth), _tags(expert=expert, replica=replica))


def count_scored(expert: str, samples: int) -> None:
    """Add ``samples`` scored samples (zero is skipped)."""
    _touch(expert)
    _inc("scored", float(samples), _tags(expert=expert))


def count_failure(expert: str, kind: str, n: int = 1) -> None:
    """Add ``n`` failures of ``kind`` (bad_request, error, timeout, replica_died, dropped, ...)."""
    _touch(expert)
    _inc("failures", float(n), _tags(expert=expert, kind=kind))


def set_replicas(expert: str, replicas: int) -> None:
    """Set a deployment's replica count (and create its zero failure series)."""
    _touch(expert)
    _set_gauge("replicas", float(replicas), _tags(expert=expert))


def watch_replicas(count_running, experts: list[str], period_s: float = REFRESH_S) -> threading.Event:
    """Every ``period_s`` seconds set the replica gauge of each expert to ``count_running(expert)`` (the running
    replicas per the Serve controller), so a live ``launch.scale`` or a replaced replica shows up. Returns the
    event that stops the watcher."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for expert in experts:
                try:
                    set_replicas(expert, int(count_running(expert)))
                except Exception as exc:  # noqa: BLE001 - Serve shut down or restarting: try again later
                    log.debug("replica count of %s not refreshed: %s", expert, exc)
            stop.wait(period_s)

    threading.Thread(target=loop, name="reward-replicas", daemon=True).start()
    return stop


class ReplicaDeathWatch:
    """Counts reward replicas of one run's applications that died unexpectedly (SIGKILL, crash, Ray's OOM kill, a
    lost node), read from the GCS actor table. Serve re-routes a request whose replica died before accepting it, so
    no client sees an error for it; this is where such a death is counted (``kind="replica_lost"`` in
    ``reward_serve_failures`` and the step's ``faults/reward_replicas_lost``, never added to the client's
    ``faults/reward_failures``). Replicas Serve stops itself (scale-down,
    failed health check, redeploy) end by ``ray.kill`` and are not counted."""

    def __init__(self, app_names: dict[str, str]):
        """``app_names``: expert → Serve application name."""
        self.prefixes = {f"ServeReplica:{app}:": expert for expert, app in app_names.items()}
        self.seen: set[str] = set()
        self.poll(record=False)   # deaths from before the run are not the run's

    def poll(self, record: bool = True) -> dict[str, int]:
        """Expert → replicas that died since the last poll (recorded as failures unless ``record`` is False)."""
        try:
            dead = dead_actor_table()
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
            if died_unexpectedly(info.get("DeathCause")):
                found[expert] = found.get(expert, 0) + 1
        if record:
            for expert, n in found.items():
                count_failure(expert, "replica_lost", n)
                log.warning("reward expert %s: %d replica(s) died (counted as failures)", expert, n)
        return found
