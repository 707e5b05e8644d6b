"""Per-draw seeds (design D7).

Every random draw of the service is seeded from (run seed, step, prompt index, sample index, attempt,
stream), so results do not depend on batching, on the worker that ran the work, or on retries. The seed
is a stable hash (BLAKE2b over a fixed byte encoding), never Python's salted ``hash()``: the same inputs
give the same seed in every process and Python version.

Streams name independent uses of randomness for the same sample, e.g. ``"task"`` (which task / question),
``"answer"`` (IR decoding), ``"image"`` (MaskGIT draws).
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

__all__ = ["sample_seed", "make_generator", "make_numpy_generator", "SEED_BITS"]

SEED_BITS = 63
"""Seeds are non-negative 63-bit ints (fit torch's manual_seed and numpy's SeedSequence)."""

_INT64 = struct.Struct("<q")


def _check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"sample_seed: {name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"sample_seed: {name}={v} does not fit in 64 bits")
    return v


def sample_seed(run_seed: int, step: int, prompt_index: int, sample_index: int, attempt: int,
                stream: str) -> int:
    """A 63-bit seed for one draw: BLAKE2b(run_seed, step, prompt, sample, attempt, stream).

    Integers are packed as little-endian int64 and the stream name as UTF-8 after a length prefix, so
    distinct inputs never collide by concatenation. Use ``sample_index=0, attempt=0`` for per-prompt draws.
    """
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"sample_seed: stream must be a non-empty str, got {stream!r}")
    h = hashlib.blake2b(digest_size=8, person=b"unictask-seed")
    for name, v in (("run_seed", run_seed), ("step", step), ("prompt_index", prompt_index),
                    ("sample_index", sample_index), ("attempt", attempt)):
        h.update(_INT64.pack(_check_int(name, v)))
    s = stream.encode("utf-8")
    h.update(_INT64.pack(len(s)))
    h.update(s)
    return int.from_bytes(h.digest(), "little") & ((1 << SEED_BITS) - 1)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (a value from :func:`sample_seed`)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def make_numpy_generator(seed: int) -> np.random.Generator:
    """A numpy ``Generator`` (PCG64) seeded with ``seed``."""
    return np.random.default_rng(int(seed))
