"""Atomic run checkpoints with retention.

A checkpoint is a folder ``<run>/checkpoints/step_<N>`` (N = steps done = the step a resume starts at) holding the
learner's DeepSpeed checkpoint (weights or concept rows, optimizer), ``state.json`` (next step, DSOG controller
state, counters, commit time), ``rng.json`` (the driver's RNG states), the run's ``config.yaml`` and
``git_revision.txt``. It is written under ``.tmp-step_<N>`` and renamed into place only once complete (a
``COMPLETE`` marker is its last file), so a write killed half-way never replaces or damages a good checkpoint.
``latest`` names the newest complete one; a resume prefers it and falls back to the newest complete checkpoint by
commit time. Older checkpoints beyond ``keep_last`` (by commit time) are removed only after a newer one is complete.

``MANIFEST.json`` (written just before ``COMPLETE``) lists every file of the checkpoint with its size. A checkpoint
whose files do not match it (a file deleted, truncated or grown after the write) is *damaged*: ``--resume PATH``
stops with an error naming the wrong file, ``--resume auto`` and the learner rebuild use the newest intact one and
warn about each damaged one they skip; a ``latest`` that names a missing or damaged folder is warned about.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
RNG_FILE = "rng.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
MANIFEST_FILE = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def git_revision() -> str:
    """The code's git revision, ``-dirty`` when the work tree has changes ('unknown' outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip() or "unknown"
        return rev + ("-dirty" if rev != "unknown" and dirty.stdout.strip() else "")
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


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, text)
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    """True when ``path`` is a checkpoint folder whose write finished."""
    return path.is_dir() and (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()


def _manifest(folder: Path) -> dict[str, int]:
    """Relative path → size of every file under ``folder`` (the manifest itself and ``COMPLETE`` excluded)."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in (MANIFEST_FILE, COMPLETE_MARKER)}


def damage(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used (naming the wrong file), or None when it is intact.
    Checks completeness, then every file of ``MANIFEST.json`` against its recorded size (checkpoints written
    before manifests existed are checked for completeness only)."""
    path = Path(path)
    if not is_complete(path):
        return f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} / {STATE_FILE})"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"checkpoint {path}: {path / STATE_FILE} is unreadable ({exc})"
    if not (path / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"checkpoint {path}: {path / MANIFEST_FILE} is unreadable ({exc})"
    for rel, size in manifest.items():
        f = path / rel
        if not f.is_file():
            return f"checkpoint {path}: file {f} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"checkpoint {path}: file {f} has {actual} bytes, {size} were written (truncated or damaged)"
    return None


def _committed_at(path: Path) -> float:
    try:
        return float(json.loads((path / STATE_FILE).read_text()).get("committed_at", 0.0))
    except (OSError, ValueError):
        return 0.0


class CheckpointManager:
    """Creates, lists, loads and prunes the checkpoints of one run folder.

    Write protocol: ``tmp = begin(step)`` → the caller writes the learner state into ``tmp`` (and any extra files)
    → ``commit(tmp, step, state, config)``. An exception or kill anywhere before ``commit`` returns leaves the
    previous checkpoints and ``latest`` untouched; the stale temporary folder is removed by the next commit.
    """

    def __init__(self, run_dir: Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))

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
        """Write state + config + git revision into ``tmp``, then move it into place, point ``latest`` at it and
        prune old ones. Returns the final folder."""
        tmp = Path(tmp)
        if not tmp.is_dir():
            raise CheckpointError(f"commit: temporary checkpoint folder {tmp} does not exist")
        state = dict(state, step=int(step), committed_at=time.time())
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=2))
        _write_synced(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        _write_synced(tmp / "git_revision.txt", git_revision() + "\n")
        _write_synced(tmp / MANIFEST_FILE, json.dumps({"files": _manifest(tmp)}, indent=1))
        _write_synced(tmp / COMPLETE_MARKER, "ok\n")
        _fsync_dir(tmp)
        final = self.step_dir(step)
        if final.exists():  # re-doing a step after resuming from an earlier checkpoint
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)   # a kill between these two renames leaves .old, which complete() still finds
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
        self.prune()
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest commit first (a ``step_N.old`` counts only while ``step_N`` is missing)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if not p.name.startswith("step_") or not is_complete(p):
                continue
            if p.name.endswith(".old") and is_complete(p.with_name(p.name[:-4])):
                continue
            found.append(p)
        return sorted(found, key=lambda p: (_committed_at(p), p.name))

    def latest(self, warn: bool = False) -> Path | None:
        """The checkpoint ``latest`` names if it is intact, else the newest intact one, else None. With ``warn``
        every damaged checkpoint skipped is logged with the wrong file, and so is a dangling ``latest``."""
        pointer = self.root / LATEST_FILE
        skipped: set[Path] = set()
        if pointer.is_file():
            name = pointer.read_text().strip()
            cands = [c for c in (self.root / name, self.root / (name + ".old")) if name and is_complete(c)]
            for cand in cands:
                why = damage(cand)
                if why is None:
                    return cand
                skipped.add(cand)
                if warn:
                    log.warning("%s; falling back to an older checkpoint", why)
            if not cands and warn:
                log.warning("%s names %r, which is not a complete checkpoint folder (dangling pointer); using "
                            "the newest intact checkpoint instead", pointer, name)
        for cand in reversed(self.complete()):
            if cand in skipped:
                continue
            why = damage(cand)
            if why is None:
                if warn and skipped:
                    log.warning("using checkpoint %s (the newest intact one)", cand)
                return cand
            if warn:
                log.warning("%s; falling back to an older checkpoint", why)
            skipped.add(cand)
        return None

    def prune(self) -> None:
        """Delete complete checkpoints beyond ``keep_last`` (never the latest) and stale temporary folders."""
        done = self.complete()
        latest = self.latest()
        for old in done[:-self.keep_last]:
            if latest is None or old.resolve() != latest.resolve():
                shutil.rmtree(old, ignore_errors=True)
        for stale in list(self.root.glob(".tmp-step_*")) + [p for p in self.root.glob("step_*.old")
                                                            if is_complete(p.with_name(p.name[:-4]))]:
            shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``--resume auto`` → the run's latest complete checkpoint (None if there is none); a checkpoint folder →
    that folder; a run folder (holding ``checkpoints/``) → its latest checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return CheckpointManager(run_dir).latest(warn=True)
    path = Path(resume).expanduser().resolve()
    if not is_complete(path) and (path / "checkpoints").is_dir():
        latest = CheckpointManager(path).latest(warn=True)
        if latest is None:
            raise CheckpointError(f"--resume {resume}: run folder {path} has no complete, intact checkpoint")
        return latest
    if not is_complete(path):
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (expected {STATE_FILE} and "
                              f"{COMPLETE_MARKER} in {path})")
    why = damage(path)
    if why is not None:
        raise CheckpointError(f"--resume {resume}: {why}")
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state, saved config dict) of a complete checkpoint folder (CheckpointError naming the folder otherwise)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} / {STATE_FILE})")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).exists() else {}
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    if "next_step" not in state:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has no 'next_step'")
    return state, config or {}


# --------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """The driver's global RNG states (python, numpy, torch) as JSON-able data.

    Every draw of the service is seeded from (seed, step, prompt, sample, attempt) (design D7), so these states
    do not steer training; they are saved so that any code drawing from the global RNGs resumes identically."""
    import random

    import numpy as np
    import torch

    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    import random

    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for the 'changed config' warning)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            if isinstance(a, dict) == isinstance(b, dict) or a is None or b is None:  # a section added / removed
                changes += config_changes(a or {}, b or {}, dotted)
                continue
        if a != b:
            changes.append(f"{dotted}: {a!r} -> {b!r}")
    return changes
