"""Ray / Prometheus export of a run's per-step values: labelled gauges and per-run counters that stay visible.

Every series carries the labels ``run`` (``run.name``) and ``ray_job_id`` (the Ray job id, the same in the driver
and in every actor of the job; ``ray job list`` maps it to the submission id). The label is not called ``job``: a
Prometheus server owns ``job`` and ``instance`` (its scrape config sets them on every target; Ray's generated one
says ``job: ray``), so a ``job`` label on the series would be renamed ``exported_job`` on ingestion and every query
written against ``job`` would match nothing. What the endpoint keeps, and for how long:

- Gauges: Ray's metrics agent drops a gauge that has not been re-reported for two report intervals (about 20 s).
  A step on real hardware takes longer, so :class:`RayExporter` re-sets its last values every ``refresh_s``
  seconds from a daemon thread until :meth:`RayExporter.close`; a finished run's gauges then age out ~20 s later.
- Counters (``<prefix>_steps_total``, ``<prefix>_images_total``) and histograms: Ray's agent keeps cumulative
  series for its whole life (``ray/_private/telemetry/open_telemetry_metric_recorder.py``: "counters are
  cumulative", never evicted), so a finished run's counters stay on the endpoint, frozen at their last values,
  until that node's Ray stops. They count the run's steps, not the process's: a resumed run first adds the steps
  done before the resume point.

Ray prefixes every name with ``ray_`` on the endpoint: ``grpo_reward_total`` is scraped as
``ray_grpo_reward_total``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading

log = logging.getLogger(__name__)

JOB_LABEL = "ray_job_id"
"""Label of the Ray job id (not ``job`` / ``instance``, which Prometheus sets itself and would rename)."""
LABELS = ("run", JOB_LABEL)
"""Label keys of every series this project exports (reward series add ``expert`` and more)."""
RUN_ENV = "UNICTASK_RUN_NAME"
"""Environment variable that carries the run name into the job's actors and reward replicas."""
REFRESH_S = 5.0
"""Seconds between re-reports of the last gauge values (Ray evicts a gauge after two ~10 s report intervals)."""


def metric_name(prefix: str, key: str) -> str:
    """Ray metric name of a metrics key: ``("grpo", "reward/total")`` → ``grpo_reward_total``."""
    return f"{prefix}_" + "".join(c if c.isalnum() else "_" for c in key)


def job_label() -> str:
    """The Ray job id of this process (driver or actor), else the submission id, else ``"local"``."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - labels are best effort
        pass
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if meta.get("job_submission_id"):
            return str(meta["job_submission_id"])
    except ValueError:
        pass
    return "local"


def submission_id() -> str | None:
    """The ``ray job submit`` submission id of this driver (None outside a submitted job)."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        return meta.get("job_submission_id")
    except ValueError:
        return None


def run_labels(run: str | None = None) -> dict[str, str]:
    """``{"run": ..., "ray_job_id": ...}``; the run name defaults to ``$UNICTASK_RUN_NAME``."""
    return {"run": run if run is not None else os.environ.get(RUN_ENV, ""), JOB_LABEL: job_label()}


def _number(value) -> bool:
    """Exported: ints and floats incl. NaN (a series with no value this step, e.g. FER on a non-human step, or the
    DSOG threshold before calibration); not bools, not infinities."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value)


class RayExporter:
    """Gauges ``<prefix>_<section>_<name>`` per numeric metric and the per-run counters, labelled ``run`` /
    ``ray_job_id``."""

    def __init__(self, prefix: str, run_name: str, describe=None, refresh_s: float = REFRESH_S,
                 unit: str = "steps"):
        self.prefix = prefix
        self.run_name = run_name
        self.describe = describe or (lambda key: f"{prefix} metric {key}")
        self.refresh_s = refresh_s
        self.unit = unit
        self._gauges: dict = {}
        self._last: dict[str, float] = {}
        self._counters: dict = {}
        self._tags: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base_steps = 0

    def start_at(self, step: int) -> None:
        """The run (re)starts at ``step``: the steps counter will first add the ``step`` steps done before."""
        self._base_steps = max(0, int(step))

    @property
    def tags(self) -> dict[str, str]:
        """The ``run`` / ``ray_job_id`` labels (resolved once Ray is connected)."""
        if self._tags is None:
            self._tags = run_labels(self.run_name)
        return self._tags

    def export(self, metrics: dict, images: float = 0.0) -> None:
        """Set one gauge per numeric key and bump the counters (raises if Ray is not usable). A NaN (nothing
        computed this step) leaves a gauge that already holds a number at that number: Ray's exporter drops NaN
        samples, so overwriting would make the series vanish from the scrape."""
        from ray.util.metrics import Counter, Gauge

        with self._lock:
            for key, value in metrics.items():
                if not _number(value):
                    continue
                if math.isnan(value) and not math.isnan(self._last.get(key, math.nan)):
                    continue   # nothing computed this step (e.g. FER on a non-human step): keep the last value
                gauge = self._gauges.get(key)
                if gauge is None:
                    doc = self.describe(key).encode("ascii", "replace").decode()  # Ray wants ASCII descriptions
                    gauge = self._gauges[key] = Gauge(metric_name(self.prefix, key), description=doc,
                                                      tag_keys=LABELS)
                gauge.set(float(value), tags=self.tags)
                self._last[key] = float(value)
            if not self._counters:
                self._counters = {
                    "steps": Counter(f"{self.prefix}_steps", f"{self.prefix} {self.unit} done in this run",
                                     tag_keys=LABELS),
                    "images": Counter(f"{self.prefix}_images", f"{self.prefix} images generated and kept in this "
                                      "run", tag_keys=LABELS)}
                # a counter series exists from the first step, even at zero (Counter.inc(0) raises, so the
                # zero is recorded directly)
                for counter in self._counters.values():
                    counter._record(0.0, tags=self.tags)
                if self._base_steps:
                    self._counters["steps"].inc(float(self._base_steps), tags=self.tags)
            self._counters["steps"].inc(1.0, tags=self.tags)
            if images > 0:
                self._counters["images"].inc(float(images), tags=self.tags)
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None and self.refresh_s > 0:
            self._thread = threading.Thread(target=self._keep_alive, name=f"{self.prefix}-metrics", daemon=True)
            self._thread.start()

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                with self._lock:
                    for key, value in self._last.items():
                        self._gauges[key].set(value, tags=self.tags)
            except Exception as exc:  # noqa: BLE001 - Ray shut down under us: stop quietly
                log.debug("metrics keep-alive stopped: %s", exc)
                return

    def close(self) -> None:
        """Stop re-reporting: the run's gauges age out of ``/metrics`` within about 20 s; its counters stay there,
        frozen, until the node's Ray stops (see the module docstring)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
