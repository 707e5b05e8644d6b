"""Per-step metrics: JSONL, TensorBoard, a compact terminal line, and Ray dashboard / Prometheus gauges."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Columns of the compact terminal line, in order (key in the metrics dict, header, format).
LINE_COLUMNS = [
    ("step", "step", "{:>5d}"),
    ("reward/total", "reward", "{:>7.4f}"),
    ("adv/std", "adv_sd", "{:>7.4f}"),
    ("learn/kl", "kl", "{:>8.2e}"),
    ("learn/clip_frac", "clip", "{:>6.3f}"),
    ("learn/grad_norm", "gnorm", "{:>8.2e}"),
    ("dsog/pass_rate", "pass", "{:>5.2f}"),
    ("dsog/threshold", "thr", "{:>7.4f}"),
    ("time/step", "sec", "{:>7.2f}"),
]


def _prom_name(key: str) -> str:
    return "grpo_" + "".join(c if c.isalnum() else "_" for c in key)


class MetricsLogger:
    """Writes one record per step to ``metrics.jsonl`` (+ TensorBoard, + Ray metrics when inside Ray)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, ray_metrics: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing is not fatal, but say so
                log.warning("TensorBoard disabled: %s", exc)
        self._gauges: dict = {}
        self._ray_metrics = ray_metrics
        self._header_printed = False

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` (a resumed run re-does them)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, metrics: dict) -> None:
        """Record one step's metrics everywhere."""
        record = {"time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = int(metrics.get("step", 0))
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._ray_metrics:
            self._export_ray(metrics)

    def _export_ray(self, metrics: dict) -> None:
        try:
            import ray
            from ray.util.metrics import Gauge

            if not ray.is_initialized():
                return
            for key, value in metrics.items():
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                gauge = self._gauges.get(key)
                if gauge is None:
                    gauge = self._gauges[key] = Gauge(_prom_name(key), description=f"GRPO metric {key}")
                gauge.set(float(value))
        except Exception as exc:
            log.debug("ray metrics export failed: %s", exc)
            self._ray_metrics = False

    def line(self, metrics: dict) -> str:
        """The compact one-line summary (header printed once)."""
        cells = []
        for key, _, fmt in LINE_COLUMNS:
            value = metrics.get(key)
            width = len(fmt.format(0 if "d" in fmt else 0.0))
            cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-".rjust(width))
        text = " ".join(cells)
        if not self._header_printed:
            self._header_printed = True
            header = " ".join(h.rjust(len(fmt.format(0 if "d" in fmt else 0.0))) for _, h, fmt in LINE_COLUMNS)
            return header + "\n" + text
        return text

    def close(self) -> None:
        """Flush and close writers."""
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
