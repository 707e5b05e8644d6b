"""Atomic run checkpoints with retention.

A checkpoint is a folder ``<run>/checkpoints/step_<N>`` (N = steps done = the step a resume starts at) holding the
learner's DeepSpeed checkpoint (weights or concept rows, optimizer), ``state.json`` (next step, DSOG controller
state, counters, commit time), ``rng.json`` (the driver's RNG states), the run's ``config.yaml`` and
``git_revision.txt``. It is written under ``.tmp-step_<N>`` and renamed into place only once complete (a
``COMPLETE`` marker is its last file), so a write killed half-way never replaces or damages a good checkpoint.
``latest`` names the newest complete one; a resume prefers it and falls back to the newest complete checkpoint by
commit time. Older checkpoints beyond ``keep_last`` (by commit time) are removed only after a newer one is complete.

``MANIFEST.json`` (written just before ``COMPLETE``) lists every file of the checkpoint with its size and SHA-256
content hash. The hash of a file the driver writes (``state.json``, ``rng.json``, ``config.yaml``, the stored
next-step rollout) is computed from the bytes as they are written (:func:`open_hashed`); files written by other
processes (the learner ranks' DeepSpeed files) are streamed through the hash once at commit, while still in the page
cache (:func:`hash_files`). A checkpoint without a manifest, or whose files do not match it (a file deleted,
truncated, grown, added or changed after the write), is *damaged*. Sizes are checked whenever checkpoints are listed
(cheap); content hashes are checked by :func:`damage` with ``verify=True`` when a checkpoint is about to be loaded
(:mod:`actors.driver.restore`). ``--resume PATH`` stops with an error naming the wrong file; ``--resume auto`` and
the learner rebuild use the newest intact one and warn about each damaged one they skip; a ``latest`` that names a
missing or damaged folder is warned about.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
RNG_FILE = "rng.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
MANIFEST_FILE = "MANIFEST.json"
HASH = "sha256"
"""Content hash of the manifest (hashlib name)."""
MANIFEST_FORMAT = 2
"""Layout of ``MANIFEST.json``: 2 = ``{"format", "hash", "files": {relative path: {"bytes", "sha256"}}}``."""
_CHUNK = 1 << 20


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


_digests: dict[str, tuple[int, int, str]] = {}
"""Files written through :func:`open_hashed`: absolute path → (bytes, mtime_ns, hex digest), used by the next commit."""
_digests_lock = threading.Lock()


class _HashingFile:
    """A binary file opened for writing that hashes every byte it writes (see :func:`open_hashed`)."""

    def __init__(self, fh):
        self._fh, self._hash, self.size = fh, hashlib.new(HASH), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += len(view)
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextlib.contextmanager
def open_hashed(path: Path):
    """Open ``path`` for binary writing; the bytes are hashed as they are written, fsynced on close, and the digest
    is remembered so that the checkpoint commit does not read the file again."""
    path = Path(path)
    with open(path, "wb") as raw:
        fh = _HashingFile(raw)
        yield fh
        raw.flush()
        os.fsync(raw.fileno())
    with _digests_lock:
        _digests[str(path.resolve())] = (fh.size, path.stat().st_mtime_ns, fh.hexdigest())


def _write_synced(path: Path, text: str, hashed: bool = False) -> None:
    """Write ``text`` and fsync it; ``hashed``: through :func:`open_hashed` (a file the manifest will list)."""
    if hashed:
        with open_hashed(path) as fh:
            fh.write(text.encode("utf-8"))
        return
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_hashed(path: Path, text: str) -> None:
    """Write a checkpoint file's ``text`` (UTF-8), hashing it as it is written (:func:`open_hashed`)."""
    _write_synced(Path(path), text, hashed=True)


def file_digest(path: Path) -> str:
    """Hex content hash of ``path``, streamed in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.new(HASH)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def hash_files(paths: list[Path], threads: int | None = None) -> dict[Path, str]:
    """Content hash of each file, several files at once (hashlib and file reads release the GIL)."""
    paths = list(paths)
    if not paths:
        return {}
    threads = threads or min(8, os.cpu_count() or 1, len(paths))
    if threads <= 1 or len(paths) == 1:
        return {p: file_digest(p) for p in paths}
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-hash") as pool:
        return dict(zip(paths, pool.map(file_digest, paths)))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, text)
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    """True when ``path`` is a checkpoint folder whose write finished."""
    return path.is_dir() and (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder`` except the manifest and ``COMPLETE``, sorted."""
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name not in (MANIFEST_FILE, COMPLETE_MARKER)]


def _manifest(folder: Path) -> dict[str, dict]:
    """Relative path → {"bytes", "sha256"} of every file under ``folder``: the digest taken while the file was written
    (:func:`open_hashed`) where there is one for its current size and time stamp, else the file streamed through the
    hash now."""
    files = _files(folder)
    known, todo = {}, []
    with _digests_lock:
        for f in files:
            st = f.stat()
            rec = _digests.pop(str(f.resolve()), None)
            if rec is not None and rec[:2] == (st.st_size, st.st_mtime_ns):
                known[f] = rec[2]
            else:
                todo.append(f)
    known.update(hash_files(todo))
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, HASH: known[f]} for f in files}


def damage(path: Path, verify: bool = False) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used (naming the wrong file), or None when it is intact.

    Checks completeness, ``state.json``, the manifest's presence, and every file against the manifest's sizes (and no
    file beside them); with ``verify`` also each file's content hash (reads every byte: done before loading)."""
    path = Path(path)
    if not is_complete(path):
        return f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} / {STATE_FILE})"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"checkpoint {path}: {path / STATE_FILE} is unreadable ({exc})"
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        return (f"checkpoint {path}: {mpath} is missing, so its files cannot be checked (a checkpoint without a "
                "manifest is never trusted)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if manifest.get("hash") != HASH or not all(isinstance(v, dict) and isinstance(v.get(HASH), str)
                                                   and isinstance(v.get("bytes"), int) for v in files.values()):
            return (f"checkpoint {path}: {mpath} has no {HASH} content hashes (format {manifest.get('format', 1)}, "
                    f"written by an older version); its files cannot be checked")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"checkpoint {path}: {mpath} is unreadable ({type(exc).__name__}: {exc})"
    for rel, rec in files.items():
        f = path / rel
        if not f.is_file():
            return f"checkpoint {path}: file {f} is missing"
        actual = f.stat().st_size
        if actual != rec["bytes"]:
            return f"checkpoint {path}: file {f} has {actual} bytes, {rec['bytes']} were written (truncated or damaged)"
    extra = [f for f in _files(path) if str(f.relative_to(path)) not in files]
    if extra:
        return f"checkpoint {path}: file {extra[0]} is not in {MANIFEST_FILE} (added after the write)"
    if verify:
        digests = hash_files([path / rel for rel in files])
        for rel, rec in files.items():
            if digests[path / rel] != rec[HASH]:
                return (f"checkpoint {path}: file {path / rel} does not match its {HASH} content hash in "
                        f"{MANIFEST_FILE} (same size, changed bytes: damaged after the write)")
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
        self.last_manifest_s = 0.0
        """Seconds the last commit spent hashing the files it had not hashed while writing."""

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
        write_hashed(tmp / STATE_FILE, json.dumps(state, indent=2))
        write_hashed(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        write_hashed(tmp / "git_revision.txt", git_revision() + "\n")
        t = time.perf_counter()
        files = _manifest(tmp)
        self.last_manifest_s = time.perf_counter() - t
        _write_synced(tmp / MANIFEST_FILE, json.dumps({"format": MANIFEST_FORMAT, "hash": HASH, "files": files},
                                                      indent=1))
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

    def candidates(self, warn: bool = False) -> list[Path]:
        """Complete checkpoints whose files match their manifest's sizes, newest first: the one ``latest`` names (or
        its ``.old`` twin), then the rest by commit time. With ``warn`` every damaged checkpoint skipped is logged
        with the wrong file, and so is a dangling ``latest``. Content hashes are checked when one is loaded
        (:func:`actors.driver.restore.restore_run_state`)."""
        pointer = self.root / LATEST_FILE
        named: list[Path] = []
        if pointer.is_file():
            name = pointer.read_text().strip()
            named = [c for c in (self.root / name, self.root / (name + ".old")) if name and is_complete(c)]
            if not named and warn:
                log.warning("%s names %r, which is not a complete checkpoint folder (dangling pointer); using "
                            "the newest intact checkpoint instead", pointer, name)
        out: list[Path] = []
        for cand in named + [c for c in reversed(self.complete()) if c not in named]:
            why = damage(cand)
            if why is None:
                out.append(cand)
            elif warn:
                log.warning("%s; falling back to an older checkpoint", why)
        return out

    def latest(self, warn: bool = False) -> Path | None:
        """The newest intact checkpoint (the first of :meth:`candidates`), else None."""
        found = self.candidates(warn=warn)
        return found[0] if found else None

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


def resume_candidates(run_dir: Path, resume: str | None) -> tuple[list[Path], bool]:
    """(checkpoints to try newest first, explicit) for ``--resume``: None → nothing; ``auto`` → the run's intact
    checkpoints (see :meth:`CheckpointManager.candidates`); a run folder (holding ``checkpoints/``) → its intact
    checkpoints; a checkpoint folder → just that one, *explicit* (a load failure then stops the run instead of
    falling back). CheckpointError when a checkpoint folder is incomplete or damaged, or when checkpoints exist but
    none is intact (the run would otherwise start again at step 0 and replace them)."""
    if not resume:
        return [], False
    if resume == "auto":
        mgr = CheckpointManager(run_dir)
    else:
        path = Path(resume).expanduser().resolve()
        if is_complete(path) or not (path / "checkpoints").is_dir():
            if not is_complete(path):
                raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (expected {STATE_FILE} "
                                      f"and {COMPLETE_MARKER} in {path})")
            why = damage(path)
            if why is not None:
                raise CheckpointError(f"--resume {resume}: {why}")
            return [path], True
        mgr = CheckpointManager(path)
    found = mgr.candidates(warn=True)
    if not found and mgr.complete():
        raise CheckpointError(f"--resume {resume}: none of the {len(mgr.complete())} checkpoint(s) in {mgr.root} is "
                              "intact (see the warnings above); move them away to start again at step 0")
    if not found and resume != "auto":
        raise CheckpointError(f"--resume {resume}: run folder {mgr.root.parent} has no complete, intact checkpoint")
    return found, False


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The first checkpoint :func:`resume_candidates` would try (None when there is none)."""
    found, _ = resume_candidates(run_dir, resume)
    return found[0] if found else None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc`` on one line (parsers' multi-line messages joined), at most ``limit`` chars."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state, saved config dict) of a complete checkpoint folder; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} / {STATE_FILE})")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {path / STATE_FILE} is unreadable ({one_line(exc)})") from exc
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).exists() else {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint {path}: {path / CONFIG_FILE} is unreadable ({one_line(exc)})") from exc
    if not isinstance(state, dict) or "next_step" not in state:
        raise CheckpointError(f"checkpoint {path}: {path / STATE_FILE} has no 'next_step'")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: {path / CONFIG_FILE} is not a mapping")
    return state, config


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


def check_rng_state(state: dict) -> None:
    """Raise (TypeError / ValueError / KeyError / RuntimeError) unless :func:`set_rng_state` can apply ``state``:
    each part is applied to a private generator, the global ones are not touched."""
    import random

    import numpy as np
    import torch

    py = state["python"]
    random.Random().setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.Generator().set_state(torch.tensor(state["torch"], dtype=torch.uint8))


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
