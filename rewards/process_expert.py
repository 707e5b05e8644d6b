"""A reward expert living in another Python interpreter, driven over a pipe (no Ray needed).

:class:`ProcessExpert` starts ``<python> -m rewards.process_worker``, builds the expert there and forwards
``score`` / ``add_reference`` / ``has_reference`` / ``dimension_scores`` calls as length-prefixed pickle frames
(both ends run this project's code; the child's stdout is moved to stderr so that library prints never corrupt
the channel). This is how code in the project's interpreter (evaluation, in-process scoring in tests) uses an
expert whose packages clash with it, e.g. UniPercept in its overlay environment. Errors come back with the
expert named; a dead child is reported as such.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import threading
from typing import Any, BinaryIO

from rewards.base import NonFiniteScoreError, ScoreBatch
from rewards.expert_env import PROJECT_ROOT

__all__ = ["ProcessExpert", "send_frame", "recv_frame"]

_HEADER = struct.Struct("!Q")
_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "NonFiniteScoreError":
           NonFiniteScoreError, "FloatingPointError": FloatingPointError}


def send_frame(stream: BinaryIO, obj: Any) -> None:
    """Write one pickled object with an 8-byte length prefix."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def recv_frame(stream: BinaryIO) -> Any:
    """Read one frame written by :func:`send_frame`; EOFError when the other end is gone."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("channel closed")
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("channel closed mid-frame")
    return pickle.loads(data)


class ProcessExpert:
    """Expert ``name`` built from ``config`` in interpreter ``python``; the RewardExpert calls, forwarded."""

    def __init__(self, name: str, config: Any, python: str | os.PathLike, env: dict[str, str] | None = None):
        self.name = name
        self.python = str(python)
        self._lock = threading.Lock()
        child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        child_env.update(env or {})
        child_env["PYTHONPATH"] = str(PROJECT_ROOT)
        self._proc = subprocess.Popen([self.python, "-m", "rewards.process_worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=child_env)
        info = self._call("build", name, config)
        self.requires: tuple[str, ...] = tuple(info["requires"])
        self.uses_references: bool = bool(info["uses_references"])
        self.config = config

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name}: its process ({self.python}) has exited with code "
                                   f"{self._proc.returncode}; see its stderr above")
            try:
                send_frame(self._proc.stdin, (method, args))
                status, payload = recv_frame(self._proc.stdout)
            except (EOFError, BrokenPipeError, OSError) as exc:
                code = self._proc.wait(timeout=10)
                raise RuntimeError(f"{self.name}: its process ({self.python}) died during {method!r} (exit code "
                                   f"{code}); see its stderr above") from exc
        if status == "ok":
            return payload
        kind, message = payload
        raise _ERRORS.get(kind, RuntimeError)(message if message.startswith(self.name) else
                                             f"{self.name}: {kind}: {message}")

    def score(self, batch: ScoreBatch) -> Any:
        """The expert's ``score`` (float32 [B])."""
        return self._call("score", batch)

    def add_reference(self, concept: str, images, category: str | None = None) -> None:
        """The expert's ``add_reference``."""
        self._call("add_reference", concept, list(images), category)

    def has_reference(self, concept: str) -> bool:
        """The expert's ``has_reference``."""
        return self._call("has_reference", concept)

    def dimension_scores(self, images) -> dict:
        """UniPercept's per-dimension 0-100 scores (experts without it raise)."""
        return self._call("dimension_scores", list(images))

    def close(self) -> None:
        """Stop the child process."""
        proc = getattr(self, "_proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            with self._lock:
                send_frame(proc.stdin, ("exit", ()))
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"ProcessExpert({self.name!r}, python={self.python!r})"
