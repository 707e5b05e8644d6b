"""Optional experiment trackers (wandb offline, MLflow SQLite store) fed by MetricsLogger, and run.trackers checks."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from actors.telemetry.logger import MetricsLogger
from actors.telemetry.trackers import Tracker, make_trackers, mlflow_store_uri
from configs.trackers import TrackerConfig, check_trackers

CONFIG = {"run": {"name": "trk", "steps": 3}, "learner": {"lr": 1e-4}, "serve": {"enabled": ["tier", "der"]}}


def _records():
    return [{"step": s, "reward/total": 0.25 * s, "reward/der": 0.5, "learn/kl": 1e-3 * (s + 1),
             "dsog/threshold": float("nan"), "concepts": "chelsea"} for s in range(3)]


def _run(tmp_path: Path, names: list[str]) -> Path:
    run = tmp_path / "trk"
    run.mkdir()
    rc = SimpleNamespace(name="trk", trackers=names, tracker=TrackerConfig())
    logger = MetricsLogger(run, ray_metrics=False, tensorboard=False, trackers=make_trackers(rc, run, CONFIG))
    grid = run / "images" / "step_000003.png"
    grid.parent.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(grid)
    for rec in _records():
        logger.log(rec)
    logger.log_image("images/grid", grid, 2)
    logger.log_image("reward_curves", grid, 2)
    logger.close()
    return run


def test_mlflow_sqlite_store_gets_scalars_config_and_pictures(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = _run(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=mlflow_store_uri(run))
    exp = client.get_experiment_by_name("unictask-grpo")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "trk" and mrun.info.status == "FINISHED"
    hist = client.get_metric_history(mrun.info.run_id, "reward/total")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert "dsog/threshold" not in mrun.data.metrics     # NaN is not logged
    assert mrun.data.params["learner.lr"] == "0.0001" and mrun.data.params["run.steps"] == "3"
    arts = {a.path for a in client.list_artifacts(mrun.info.run_id)} | {
        a.path for a in client.list_artifacts(mrun.info.run_id, "images")}
    assert {"config.json", "images/step_000003.png"} <= arts
    saved = json.loads((Path(client.download_artifacts(mrun.info.run_id, "config.json", str(tmp_path)))).read_text())
    assert saved == CONFIG


def test_wandb_offline_run_holds_scalars_config_and_pictures(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run(tmp_path, ["wandb"])
    (folder,) = (run / "wandb").glob("offline-run-*")
    log = next(folder.glob("run-*.wandb")).read_bytes()
    for key in ("reward/total", "reward/der", "learn/kl", "learner", "serve"):
        assert key.encode() in log, key
    assert b"dsog/threshold" not in log                    # NaN is not logged
    assert list(folder.glob("files/media/images/**/grid_2_*.png"))
    assert list(folder.glob("files/media/images/**/reward_curves_2_*.png"))


def test_a_failing_tracker_is_disabled_not_the_run(tmp_path):
    class Broken(Tracker):
        name = "broken"

        def __init__(self):
            self.calls = 0

        def log_scalars(self, step, metrics):
            self.calls += 1
            raise RuntimeError("tracker backend down")

        def log_image(self, key, path, step):
            raise AssertionError("disabled tracker called")

        def close(self):
            raise AssertionError("disabled tracker called")

    broken = Broken()
    logger = MetricsLogger(tmp_path, ray_metrics=False, tensorboard=False, trackers=[broken])
    for rec in _records():
        logger.log(rec)
    logger.log_image("images/grid", tmp_path / "none.png", 0)
    logger.close()
    assert broken.calls == 1 and broken.failed
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_run_trackers_are_checked_before_any_work(monkeypatch):
    from configs.schema import load_config

    with pytest.raises(ValueError, match=r"run.trackers: unknown tracker 'neptune'"):
        load_config("tiny_cpu", ["run.trackers=[tensorboard,neptune]"])
    with pytest.raises(ValueError, match=r"run.tracker.wandb_mode"):
        load_config("tiny_cpu", ["run.tracker.wandb_mode=sometimes"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"'wandb' needs the 'wandb' package.*\[trackers\]"):
        check_trackers(["wandb"])
    assert load_config("tiny_cpu", ["run.trackers=[tensorboard,mlflow]"]).run.trackers == ["tensorboard", "mlflow"]
