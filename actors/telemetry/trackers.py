"""Optional experiment trackers beside TensorBoard and ``metrics.jsonl``: Weights & Biases and MLflow.

``run.trackers: [tensorboard, wandb, mlflow]`` picks them. Each gets the same scalars as ``metrics.jsonl`` (every
numeric key, ``section/name``, at the 0-based step), the whole config once, the image grids and the reward curves.
Both default to offline stores inside the run folder, so nothing leaves the machine unless asked:

- wandb: ``mode: offline`` into ``<run>/wandb`` (``wandb sync <run>/wandb/offline-run-*`` uploads later);
- MLflow: a SQLite store ``<run>/mlflow.db`` with the artifacts (config, pictures) in ``<run>/mlflow-artifacts``
  (``mlflow ui --backend-store-uri sqlite:///<absolute run>/mlflow.db`` shows it, REST API included; a database is
  what MLflow 3 wants: its file store is in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``), or any tracking
  URI in ``run.tracker.mlflow_tracking_uri``.

Neither package is a dependency of the core install: ``pip install -e '.[trackers]'`` installs wandb and the full
``mlflow`` (its ``mlflow ui`` / ``mlflow server`` need Flask, SQLAlchemy and Alembic, which ``mlflow-skinny`` lacks).
Asking for one that is not installed is a config error before any work starts; a tracker that fails during the run
is logged and disabled, never the run.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from configs.trackers import TrackerConfig, check_trackers

log = logging.getLogger(__name__)


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics record, without ``step``."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    """``{"run": {"steps": 3}}`` → ``{"run.steps": "3"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:500]
    return out


class Tracker:
    """One experiment tracker: scalars per step, the config, pictures. ``failed`` disables it."""

    name = "tracker"
    failed = False

    def log_scalars(self, step: int, metrics: dict) -> None:
        """Log a step's numeric metrics."""
        raise NotImplementedError

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log a PNG of the run (image grid, reward curves) at ``step``."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish the tracker's run."""
        raise NotImplementedError

    def log_samples(self, path: Path, rows: list[dict], step: int) -> None:
        """Log a step's sample records (``path``: ``<run>/samples/step_<N>.jsonl``, ``rows``: its rows, whose
        ``image`` is relative to ``path``'s folder): wandb a Table ``samples`` with the images in a ``picture`` column
        (an offline run also logs them as ``samples_images``: wandb keeps no table images offline), MLflow the JSONL
        and the step's PNGs as artifacts under ``samples/``; other trackers ignore them."""
        folder = Path(path).parent
        if isinstance(self, WandbTracker):
            wb = self._wandb
            cols = list(rows[0]) if rows else []
            table = wb.Table(columns=cols + ["picture"])
            pictures = []
            for r in rows:
                caption = f"{r['prompt_index']}/{r['sample_index']} R={r['reward']} A={r['advantage']} {r['dsog']}"
                pictures.append(wb.Image(str(folder / r["image"]), caption=caption))
                table.add_data(*[str(v) if isinstance(v, list) else v for v in r.values()], pictures[-1])
            logged = {"samples": table}
            if getattr(self.run, "offline", False):
                logged["samples_images"] = pictures
            self.run.log(logged, step=int(step))
        elif isinstance(self, MlflowTracker):
            self.client.log_artifact(self.run_id, str(path), artifact_path="samples")
            images = folder / Path(path).stem
            if images.is_dir():
                self.client.log_artifacts(self.run_id, str(images), artifact_path=f"samples/{images.name}")


class WandbTracker(Tracker):
    """Weights & Biases, offline by default (``<run>/wandb``)."""

    name = "wandb"

    def __init__(self, cfg: TrackerConfig, run_dir: Path, run_name: str, config: dict):
        import wandb

        self._wandb = wandb
        folder = Path(cfg.wandb_dir or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, name=run_name, dir=str(folder), mode=cfg.wandb_mode,
                              config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.dir = Path(self.run.dir).parent if self.run is not None else folder / "wandb"

    def log_scalars(self, step: int, metrics: dict) -> None:
        self.run.log(scalars(metrics), step=int(step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path), caption=Path(path).name)}, step=int(step))

    def close(self) -> None:
        """Finish the run, then stop wandb's service process: ``finish`` alone can return before the service has
        written the run's records to ``run-*.wandb``; the teardown waits for that flush."""
        self.run.finish()
        self._wandb.teardown()


MLFLOW_DB = "mlflow.db"
"""File name of the run's MLflow SQLite store (in the run folder)."""
MLFLOW_ARTIFACTS = "mlflow-artifacts"
"""Folder of the run's MLflow artifacts (in the run folder)."""


def mlflow_store_uri(run_dir: Path) -> str:
    """The default MLflow tracking URI of a run: ``sqlite:////<absolute run folder>/mlflow.db``."""
    return "sqlite:///" + str((Path(run_dir) / MLFLOW_DB).resolve())


class MlflowTracker(Tracker):
    """MLflow through its client API; a SQLite store ``<run>/mlflow.db`` (artifacts in ``<run>/mlflow-artifacts``)
    unless a tracking URI is given."""

    name = "mlflow"

    def __init__(self, cfg: TrackerConfig, run_dir: Path, run_name: str, config: dict):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_tracking_uri or mlflow_store_uri(run_dir)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow >= 3.x keeps the file store (the only backend without a database) behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.project)
        # a database store's default artifact root is ./mlruns of the working directory: keep them in the run
        artifacts = None if cfg.mlflow_tracking_uri else (Path(run_dir) / MLFLOW_ARTIFACTS).resolve().as_uri()
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            cfg.project, artifact_location=artifacts)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.tracking_uri = uri
        params = flatten(config)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):   # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_scalars(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(step)) for k, v in scalars(metrics).items()])

    def log_image(self, key: str, path: Path, step: int) -> None:
        folder = "images" if key.startswith("images") else ""
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def make_trackers(run_cfg, run_dir: Path, config: dict) -> list[Tracker]:
    """The wandb / MLflow trackers named in ``run_cfg.trackers`` (TensorBoard is handled by MetricsLogger)."""
    names = list(getattr(run_cfg, "trackers", []) or [])
    check_trackers(names)
    tcfg = getattr(run_cfg, "tracker", None) or TrackerConfig()
    out: list[Tracker] = []
    for name in names:
        if name == "wandb":
            out.append(WandbTracker(tcfg, run_dir, run_cfg.name, config))
        elif name == "mlflow":
            out.append(MlflowTracker(tcfg, run_dir, run_cfg.name, config))
    for t in out:
        log.info("experiment tracker %s: %s", t.name, getattr(t, "tracking_uri", None) or getattr(t, "dir", ""))
    return out
