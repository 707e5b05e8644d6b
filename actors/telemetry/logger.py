"""Per-step metrics: JSONL, TensorBoard, a compact terminal line, and Ray dashboard / Prometheus gauges.

- ``<run>/metrics.jsonl``: one JSON record per step (every key of :func:`actors.telemetry.step_metrics.step_metrics`).
- ``<run>/tensorboard/``: one scalar per key (``tensorboard --logdir <run>/tensorboard``).
- Ray metrics (``ray.util.metrics``, see :mod:`actors.telemetry.prometheus`): a gauge ``<prefix>_<section>_<name>`` per key
  (prefix ``grpo`` for training, ``inject`` for concept injection), labelled ``run`` and ``ray_job_id``, plus per-run
  counters ``<prefix>_steps`` / ``<prefix>_images``. Ray prefixes them with ``ray_`` on the Prometheus endpoint
  (``http://127.0.0.1:<metrics_export_port>/metrics``, within one report interval, ~10 s) and
  ``dashboards/grafana_grpo.json`` plots them.
- Experiment trackers (:mod:`actors.telemetry.trackers`: wandb, MLflow) get the same scalars.
- :meth:`MetricsLogger.line`: the compact table row the controller prints under its progress bar: step N/total,
  the main metrics, elapsed time, ETA, time of day and the concept(s) the step trained.

On resume :meth:`MetricsLogger.start_at` drops the JSONL records of the steps that will be re-done and opens the
TensorBoard writer with ``purge_step`` so those steps are not plotted twice.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from pathlib import Path

from actors.telemetry.prometheus import RayExporter

log = logging.getLogger(__name__)

# Columns of the compact terminal line, in order (key in the metrics dict, header, format).
LINE_COLUMNS = [
    ("reward/total", "reward", "{:>7.4f}"),
    ("adv/std", "adv_sd", "{:>7.4f}"),
    ("adv/equal_reward_groups", "eq", "{:>4.2f}"),
    ("learn/loss", "loss", "{:>9.2e}"),
    ("learn/kl", "kl", "{:>8.2e}"),
    ("learn/clip_frac", "clip", "{:>5.3f}"),
    ("learn/grad_norm", "gnorm", "{:>8.2e}"),
    ("learn/logp_mismatch_image", "mism", "{:>8.2e}"),
    ("dsog/pass_rate", "pass", "{:>4.2f}"),
    ("dsog/threshold", "thr", "{:>7.4f}"),
    ("dsog/attempts_per_sample", "att", "{:>4.2f}"),
    ("throughput/images_per_s", "img/s", "{:>6.2f}"),
    ("time/step", "sec", "{:>6.2f}"),
]
HEADER_EVERY = 25
"""Repeat the header after this many rows."""


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration (``-`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _width(fmt: str) -> int:
    return len(fmt.format(0 if fmt.endswith("d}") else 0.0))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLogger:
    """Writes one record per step to ``metrics.jsonl`` (+ TensorBoard, + Ray metrics when inside Ray)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, ray_metrics: bool = True, run_name: str = "",
                 prefix: str = "grpo", total_steps: int | None = None, trackers: list | None = None):
        """``prefix``: Ray metric prefix ("grpo" for GRPO steps, "inject" for concept injection);
        ``total_steps``: the run's step count (for N/total and the ETA in :meth:`line`); ``trackers``:
        :class:`actors.telemetry.trackers.Tracker` objects that get every record too."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_name = run_name or self.run_dir.name
        self._tensorboard = tensorboard
        self._tb = None
        self._tb_failed = False
        self._purge_step: int | None = None
        self.prefix = prefix
        self.total_steps = total_steps
        self.trackers = list(trackers or [])
        self._exporter = RayExporter(prefix, self.run_name, describe=_describe(prefix))
        self._ray_metrics = ray_metrics
        self._rows = 0
        self._t0 = time.monotonic()
        self._start_step = 0

    # -- resume ----------------------------------------------------------------------------------------------
    def start_at(self, step: int) -> None:
        """The run (re)starts at ``step``: drop records of steps >= ``step`` and have TensorBoard purge them."""
        self.truncate_after(step - 1)
        self._purge_step = int(step)
        self._start_step = int(step)
        self._t0 = time.monotonic()
        self._exporter.start_at(step)
        if self._tb is not None:  # reopen so the purge applies
            self._tb.close()
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` (a resumed run re-does them); a torn last line is dropped too."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if line.strip() and json.loads(line).get("step", -1) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    # -- recording -------------------------------------------------------------------------------------------
    def log(self, metrics: dict) -> None:
        """Record one step's metrics everywhere."""
        record = {"time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        step = int(metrics.get("step", 0))
        tb = self._writer()
        if tb is not None:
            for key, value in metrics.items():
                if _is_number(value) and key != "step" and math.isfinite(value):
                    tb.add_scalar(key, value, step)
            tb.flush()
        if self._ray_metrics:
            self._export_ray(metrics)
        for tracker in self.trackers:
            _guard(tracker, "log_scalars", step, metrics)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Hand a picture of the run (image grid, reward curves) to the experiment trackers."""
        for tracker in self.trackers:
            _guard(tracker, "log_image", key, Path(path), step)

    def log_samples(self, path: Path, rows: list[dict], step: int) -> None:
        """Show a step's sample records (``path``: its ``samples/step_<N>.jsonl``, ``rows``: its rows) as a
        TensorBoard text table (tag ``samples``) and hand them to the experiment trackers."""
        tb = self._writer()
        if tb is not None and rows:
            from actors.telemetry.samples import markdown_table

            tb.add_text("samples", markdown_table(rows), int(step))
            tb.flush()
        for tracker in self.trackers:
            _guard(tracker, "log_samples", Path(path), rows, step)

    def _writer(self):
        if self._tb is None and self._tensorboard and not self._tb_failed:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
            except Exception as exc:  # tensorboard missing is not fatal, but say so once
                log.warning("TensorBoard disabled: %s", exc)
                self._tb_failed = True
        return self._tb

    def _export_ray(self, metrics: dict) -> None:
        """Set one gauge per numeric key (labels ``run``, ``ray_job_id``) and bump the per-run counters."""
        try:
            import ray

            if not ray.is_initialized():
                return
            images = metrics.get("throughput/images", 0)
            self._exporter.export(metrics, images=float(images) if _is_number(images) else 0.0)
        except Exception as exc:
            log.warning("Ray metrics export disabled: %s", exc)
            self._ray_metrics = False

    # -- terminal --------------------------------------------------------------------------------------------
    def header(self) -> str:
        """The column header of :meth:`line`."""
        return " ".join(["step".rjust(self._step_width())] + [h.rjust(_width(fmt)) for _, h, fmt in LINE_COLUMNS]
                        + ["elapsed".rjust(8), "eta".rjust(8), "time".rjust(8), "concept"])

    def _step_width(self) -> int:
        total = self.total_steps or 0
        return max(4, 2 * len(str(total)) + 1)

    def line(self, metrics: dict) -> str:
        """The compact one-line summary (preceded by the header on the first row and every HEADER_EVERY rows):
        step N/total (N = steps done, so metrics.jsonl's 0-based ``step`` is N - 1), the main metrics, elapsed
        time since the loop started, ETA, time of day (UTC) and the concept(s) the step trained."""
        done = int(metrics.get("step", 0)) + 1
        total = self.total_steps
        cells = [(f"{done}/{total}" if total else str(done)).rjust(self._step_width())]
        for key, _, fmt in LINE_COLUMNS:
            value = metrics.get(key)
            ok = _is_number(value) and (isinstance(value, int) or math.isfinite(value))
            cells.append(fmt.format(value) if ok else "-".rjust(_width(fmt)))
        elapsed = time.monotonic() - self._t0
        steps_here = done - self._start_step
        eta = elapsed / steps_here * (total - done) if total and steps_here > 0 else float("nan")
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        cells += [clock(elapsed).rjust(8), clock(eta).rjust(8), now, str(metrics.get("concepts", "-") or "-")]
        text = " ".join(cells)
        if self._rows % HEADER_EVERY == 0:
            text = self.header() + "\n" + text
        self._rows += 1
        return text

    def close(self) -> None:
        """Flush and close writers."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._exporter.close()
        for tracker in self.trackers:
            _guard(tracker, "close")
        self.trackers = []


def _guard(tracker, method: str, *args) -> None:
    """Call a tracker method; a tracker failure is logged and disables that tracker, never the run."""
    if getattr(tracker, "failed", False):
        return
    try:
        getattr(tracker, method)(*args)
    except Exception as exc:  # noqa: BLE001 - trackers are best effort by design
        log.warning("experiment tracker %s: %s failed (%s: %s); disabling it", getattr(tracker, "name", tracker),
                    method, type(exc).__name__, exc)
        tracker.failed = True


def _describe(prefix: str):
    def describe(key: str) -> str:
        from actors.telemetry.step_metrics import metric_doc

        return metric_doc(key) if prefix == "grpo" else f"Concept injection metric {key}"
    return describe


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            if line.strip():
                out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
