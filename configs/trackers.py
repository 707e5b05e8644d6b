"""Experiment-tracker configuration (wandb, MLflow, TensorBoard) and the check that their packages exist."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow")
"""Values accepted in ``run.trackers``."""


_PACKAGE = {"wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class TrackerConfig:
    """Settings of the optional experiment trackers (wandb, MLflow)."""

    project: str = "unictask-grpo"
    """wandb project and MLflow experiment the run is logged under."""
    wandb_mode: str = "offline"
    """wandb mode: offline (local files only, default), online (needs a login and network) or disabled."""
    wandb_dir: str | None = None
    """Folder wandb writes its ``wandb/`` folder into; None = the run folder (files in ``<run>/wandb/``)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; None = a SQLite store ``sqlite:///<run>/mlflow.db`` (artifacts in
    ``<run>/mlflow-artifacts``), which ``mlflow ui --backend-store-uri`` opens as it is."""

    def validate(self) -> None:
        """Reject impossible values."""
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"run.tracker.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if not self.project:
            raise ValueError("run.tracker.project must not be empty")


def check_trackers(names: list[str]) -> None:
    """Unknown names and trackers whose package is not installed are errors naming the key."""
    for name in names:
        if name not in KNOWN_TRACKERS:
            raise ValueError(f"run.trackers: unknown tracker {name!r} (known: {', '.join(KNOWN_TRACKERS)})")
        pkg = _PACKAGE.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ValueError(f"run.trackers: {name!r} needs the {pkg!r} package, which is not installed "
                             f"(pip install -e '.[trackers]')")
