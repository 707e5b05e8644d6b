"""Per-step metrics: JSONL, TensorBoard, a compact terminal line, and Ray dashboard / Prometheus gauges.

- ``<run>/metrics.jsonl``: one JSON record per step (every key of :func:`actors.step_metrics.step_metrics`).
- ``<run>/tensorboard/``: one scalar per key (``tensorboard --logdir <run>/tensorboard``).
- Ray metrics (``ray.util.metrics``): a gauge ``grpo_<section>_<name>`` per key, tagged with the run name, plus
  counters ``grpo_steps`` / ``grpo_images``. Ray prefixes them with ``ray_`` on the Prometheus endpoint
  (``http://127.0.0.1:<metrics_export_port>/metrics``, about 10 s after being recorded) and the dashboard's
  metrics view reads them from there.
- :meth:`MetricsLogger.line`: the compact table row the controller prints under its progress bar.

On resume :meth:`MetricsLogger.start_at` drops the JSONL records of the steps that will be re-done and opens the
TensorBoard writer with ``purge_step`` so those steps are not plotted twice.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Columns of the compact terminal line, in order (key in the metrics dict, header, format).
LINE_COLUMNS = [
    ("step", "step", "{:>5d}"),
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


def prom_name(key: str) -> str:
    """Ray/Prometheus metric name of a metrics key: ``reward/total`` → ``grpo_reward_total``."""
    return "grpo_" + "".join(c if c.isalnum() else "_" for c in key)


def _width(fmt: str) -> int:
    return len(fmt.format(0 if fmt.endswith("d}") else 0.0))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLogger:
    """Writes one record per step to ``metrics.jsonl`` (+ TensorBoard, + Ray metrics when inside Ray)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, ray_metrics: bool = True, run_name: str = ""):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_name = run_name or self.run_dir.name
        self._tensorboard = tensorboard
        self._tb = None
        self._tb_failed = False
        self._purge_step: int | None = None
        self._gauges: dict = {}
        self._counters: dict = {}
        self._ray_metrics = ray_metrics
        self._rows = 0

    # -- resume ----------------------------------------------------------------------------------------------
    def start_at(self, step: int) -> None:
        """The run (re)starts at ``step``: drop records of steps >= ``step`` and have TensorBoard purge them."""
        self.truncate_after(step - 1)
        self._purge_step = int(step)
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
        """Set one gauge per numeric key (tag ``run``) and bump the step / image counters."""
        try:
            import ray
            from ray.util.metrics import Counter, Gauge

            if not ray.is_initialized():
                return
            from actors.step_metrics import metric_doc

            tags = {"run": self.run_name}
            for key, value in metrics.items():
                if not _is_number(value) or not math.isfinite(value):
                    continue
                gauge = self._gauges.get(key)
                if gauge is None:
                    doc = metric_doc(key).encode("ascii", "replace").decode()  # Ray wants ASCII descriptions
                    gauge = self._gauges[key] = Gauge(prom_name(key), description=doc, tag_keys=("run",))
                gauge.set(float(value), tags=tags)
            if not self._counters:
                self._counters = {"steps": Counter("grpo_steps", "GRPO steps done", tag_keys=("run",)),
                                  "images": Counter("grpo_images", "Images generated and kept", tag_keys=("run",))}
            self._counters["steps"].inc(1.0, tags=tags)
            images = metrics.get("throughput/images", 0)
            if _is_number(images) and images > 0:  # Counter.inc(0) raises
                self._counters["images"].inc(float(images), tags=tags)
        except Exception as exc:
            log.warning("Ray metrics export disabled: %s", exc)
            self._ray_metrics = False

    # -- terminal --------------------------------------------------------------------------------------------
    def header(self) -> str:
        """The column header of :meth:`line`."""
        return " ".join(h.rjust(_width(fmt)) for _, h, fmt in LINE_COLUMNS)

    def line(self, metrics: dict) -> str:
        """The compact one-line summary (preceded by the header on the first row and every HEADER_EVERY rows)."""
        cells = []
        for key, _, fmt in LINE_COLUMNS:
            value = metrics.get(key)
            ok = _is_number(value) and (isinstance(value, int) or math.isfinite(value))
            cells.append(fmt.format(value) if ok else "-".rjust(_width(fmt)))
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
