"""The rollout that is already done when a step ends (``run.overlap: one_step``), and how a checkpoint keeps it.

With one-step overlap the rollout of step k+1 runs while the learner updates on step k, with the weights from
before update k. When step k ends, that rollout is finished but not yet learned from, and the weights that made it
exist nowhere any more (the learner and, after the sync, the rollout actors hold the updated ones). A checkpoint
taken after step k therefore stores the finished rollout itself (:data:`PENDING_FILE`, written into the
checkpoint's temporary folder so the write stays atomic and the manifest covers it); resuming learns from exactly
those samples, so an overlapped run resumes bit for bit like an uninterrupted one.

The file is a pickle, like DeepSpeed's own checkpoint files beside it: load checkpoints you trust.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from actors.driver.checkpoint import CheckpointError, open_hashed

PENDING_FILE = "next_rollout.pkl"
"""File name of the stored next-step rollout inside a checkpoint folder."""
FORMAT = 1
"""Version of the file's layout."""


@dataclass
class PendingRollout:
    """A finished rollout for ``step`` that the learner has not used yet."""

    step: int
    """The GRPO step the rollout belongs to (the resume point of the checkpoint that stores it)."""
    results: list
    """Its GroupResults, in request order (actors.rollout.engine.GroupResult)."""


def save_pending(folder: Path, pending: PendingRollout) -> Path:
    """Write ``pending`` into the (temporary) checkpoint folder ``folder``, hashing it as it is written (the manifest's
    content hash); returns the file."""
    path = Path(folder) / PENDING_FILE
    with open_hashed(path) as f:
        pickle.dump({"format": FORMAT, "step": int(pending.step), "results": pending.results}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_pending(folder: Path, step: int) -> PendingRollout | None:
    """The stored rollout of checkpoint ``folder`` (None when it has none: an on-policy checkpoint, or the last
    step's). Raises CheckpointError naming the file when it is unreadable or belongs to another step than ``step``."""
    path = Path(folder) / PENDING_FILE
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception as exc:   # truncated or foreign file: name it
        raise CheckpointError(f"checkpoint {folder}: {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder}: {path} is not a stored rollout of format {FORMAT}")
    if int(data["step"]) != int(step):
        raise CheckpointError(f"checkpoint {folder}: {path} holds the rollout of step {data['step']}, but the "
                              f"checkpoint resumes at step {step}")
    return PendingRollout(int(data["step"]), list(data["results"]))
