"""Separate Python environments for reward experts whose packages clash with the project's (UniPercept pins
``transformers==4.49.0``; the project runs 5.x).

An *overlay* environment is a venv of the project's own base interpreter that holds only the pinned packages of
``envs/<name>/requirements.lock`` and reaches everything else (torch, numpy, Ray, this project) through one
``.pth`` line that adds the project interpreter's site-packages *after* its own: the pinned packages shadow the
project's versions, and no second torch is ever installed. ``python -m launch.build_reward_env <name>`` builds
it; Serve runs an expert's replicas in it through ``serve.<expert>.python`` (Ray ``runtime_env.py_executable``).

This module holds what both sides need: where the lock and the default environment live, reading the lock, and
the start-up check :func:`check_python` that turns a missing, stale or broken environment into one clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["PROJECT_ROOT", "MARKER", "ExpertEnvError", "lock_path", "read_lock", "lock_digest", "default_dest",
           "resolve_python", "check_python"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The repository root (relative ``serve.<expert>.python`` paths and ``envs/`` are resolved against it)."""

MARKER = "unictask-env.json"
"""File in an overlay environment's root recording what it was built from (env name, lock digest, sizes)."""


class ExpertEnvError(RuntimeError):
    """An expert's Python environment is missing, stale or broken; the message says which and how to fix it."""


def lock_path(name: str) -> Path:
    """``envs/<name>/requirements.lock`` (a ValueError naming the known environments when there is none)."""
    path = PROJECT_ROOT / "envs" / name / "requirements.lock"
    if not path.is_file():
        known = sorted(p.parent.name for p in (PROJECT_ROOT / "envs").glob("*/requirements.lock"))
        raise ValueError(f"unknown expert environment {name!r}; known: {known}")
    return path


def read_lock(name: str) -> dict[str, str]:
    """``{distribution name (normalised): exact version}`` of the lock's ``name==version`` lines."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(lock_path(name).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pkg, sep, version = line.partition("==")
        if not sep or not version.strip() or any(c in version for c in "<>=!~*, "):
            raise ValueError(f"{lock_path(name)}:{n}: expected an exact pin 'name==version', got {raw!r}")
        pins[_norm(pkg)] = version.strip()
    return pins


def lock_digest(name: str) -> str:
    """sha256 of the lock file (an environment built from another lock is stale)."""
    return hashlib.sha256(lock_path(name).read_bytes()).hexdigest()


def default_dest(name: str) -> Path:
    """Default location of environment ``name``: ``<repo>/.venv-<name>`` (gitignored)."""
    return PROJECT_ROOT / f".venv-{name}"


def resolve_python(value: str) -> Path:
    """An interpreter path from config: absolute, ``~``-expanded, or relative to the repository root."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else PROJECT_ROOT / path


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


_PROBE = """
import importlib.metadata as md, importlib.util as iu, json, sys
names = json.loads(sys.argv[1])
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
spec = iu.find_spec("transformers")
print(json.dumps({"python": list(sys.version_info[:2]), "prefix": sys.prefix, "versions": versions,
                  "transformers_at": spec.origin if spec else None, "ray": iu.find_spec("ray") is not None}))
"""


def check_python(python: str | os.PathLike, expert: str, timeout_s: float = 60.0) -> dict:
    """Check the interpreter an expert will run in; returns what was found or raises :class:`ExpertEnvError`.

    Checks: the file exists and starts; its Python major.minor is the driver's (Ray needs that); Ray imports
    there. When it is an overlay environment (it has a :data:`MARKER`), also: every pinned package of its lock is
    installed at the pinned version and shadows the project's copy, and the lock has not changed since the build.
    """
    python = Path(python)
    field = f"serve.{expert}.python"
    hint = "build it with `python -m launch.build_reward_env {}`"
    fix = "rebuild it with `python -m launch.build_reward_env {} --force`"
    root = python.parent.parent
    marker = root / MARKER
    info = json.loads(marker.read_text()) if marker.is_file() else None
    name = (info or {}).get("env") or expert
    if not python.exists():
        raise ExpertEnvError(f"reward expert {expert!r}: {field} = {str(python)!r} does not exist; "
                             + hint.format(name) + " (on every node, at the same path)")
    pins = read_lock(name) if info else {}
    try:
        proc = subprocess.run([str(python), "-c", _PROBE, json.dumps(sorted(pins))], capture_output=True, text=True,
                              timeout=timeout_s, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExpertEnvError(f"reward expert {expert!r}: {field} = {str(python)!r} does not start "
                             f"({type(exc).__name__}: {exc}); " + hint.format(name)) from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExpertEnvError(f"reward expert {expert!r}: {field} = {str(python)!r} is broken ({tail}); "
                             + fix.format(name))
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if tuple(found["python"]) != tuple(sys.version_info[:2]):
        raise ExpertEnvError(f"reward expert {expert!r}: {field} runs Python {'.'.join(map(str, found['python']))}"
                             f", the driver {sys.version_info[0]}.{sys.version_info[1]} (Ray needs the same)")
    if not found["ray"]:
        raise ExpertEnvError(f"reward expert {expert!r}: Ray does not import in {field} = {str(python)!r}; "
                             + fix.format(name))
    if info:
        wrong = {n: (v, found["versions"].get(n)) for n, v in pins.items() if found["versions"].get(n) != v}
        if wrong:
            desc = ", ".join(f"{n} {have or 'missing'} (lock {want})" for n, (want, have) in sorted(wrong.items()))
            raise ExpertEnvError(f"reward expert {expert!r}: environment {str(root)!r} is broken: {desc}; "
                                 + fix.format(name))
        at = found.get("transformers_at") or ""
        if "transformers" in pins and not Path(at).resolve().is_relative_to(Path(found["prefix"]).resolve()):
            raise ExpertEnvError(f"reward expert {expert!r}: in {str(root)!r} transformers comes from {at!r}, not "
                                 f"from the environment itself; " + fix.format(name))
        if info.get("lock_sha256") != lock_digest(name):
            raise ExpertEnvError(f"reward expert {expert!r}: environment {str(root)!r} was built from an older "
                                 f"envs/{name}/requirements.lock; " + fix.format(name))
    return found
