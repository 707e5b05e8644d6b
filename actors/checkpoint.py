"""Atomic run checkpoints with retention.

A checkpoint is a folder ``<run>/checkpoints/step_<N>`` holding the learner state (DeepSpeed: weights, optimizer),
``state.json`` (next step, DSOG controller state, counters), the run's config and git revision. It is written
under a temporary name and renamed into place only when complete, so a write killed half-way never replaces or
damages a good checkpoint; ``latest`` names the newest complete one. Older checkpoints beyond ``keep_last`` are
removed only after a newer one is complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def git_revision() -> str:
    """The code's git revision (or 'unknown' outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=5)
        rev = out.stdout.strip() or "unknown"
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Creates, lists, loads and prunes the checkpoints of one run folder."""

    def __init__(self, run_dir: Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        """Final folder of the checkpoint taken after ``step`` steps."""
        return self.root / f"step_{step:06d}"

    def begin(self, step: int) -> Path:
        """A fresh temporary folder to write the checkpoint of ``step`` into."""
        tmp = self.root / f".tmp-step_{step:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: dict, config: dict) -> Path:
        """Write state + config into ``tmp``, then atomically move it into place and prune old ones."""
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "git_revision.txt").write_text(git_revision() + "\n")
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        final = self.step_dir(step)
        if final.exists():
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        write_text_atomic(self.root / "latest", final.name + "\n")
        self.prune()
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        dirs = [p for p in self.root.iterdir()
                if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".old")
                and (p / COMPLETE_MARKER).exists() and (p / STATE_FILE).exists()]
        return sorted(dirs, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def prune(self) -> None:
        """Delete complete checkpoints beyond ``keep_last`` and stale temporary folders."""
        done = self.complete()
        for old in done[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``--resume auto`` → the run's latest complete checkpoint (None if there is none); a path → that path."""
    if not resume:
        return None
    if resume == "auto":
        return CheckpointManager(run_dir).latest()
    path = Path(resume).expanduser().resolve()
    if not (path / STATE_FILE).exists() or not (path / COMPLETE_MARKER).exists():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (expected {STATE_FILE} and "
                              f"{COMPLETE_MARKER} in {path})")
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state, saved config dict) of a checkpoint folder."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).exists() else {}
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    return state, config


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for the 'changed config' warning)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, dotted)
        elif a != b:
            changes.append(f"{dotted}: {a!r} -> {b!r}")
    return changes
