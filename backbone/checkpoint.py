"""Load / save a ShowoPhi in Show-o's safetensors key names (``showo.model.*``, ``showo.lm_head.*``).

Strict: a missing file is a FileNotFoundError, a missing / unexpected key or a wrong shape a ValueError naming the file
and the first bad key. Nothing is ever left randomly initialised.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PREFIX = "showo."
"""Prefix of every Phi key in Show-o's checkpoints (``Showo.showo`` is the ``PhiForCausalLM``)."""
WEIGHT_NAMES = ("pytorch_model.safetensors", "model.safetensors")
"""File names looked for inside a checkpoint directory, in order (Show-o uses the first)."""


def resolve_showo_file(path_or_dir: str | os.PathLike) -> Path:
    """The safetensors file itself, or the first of :data:`WEIGHT_NAMES` inside a directory."""
    p = Path(path_or_dir).expanduser()
    if p.is_dir():
        for name in WEIGHT_NAMES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no Show-o weights in directory {str(p)!r}: expected one of {list(WEIGHT_NAMES)}")
    if not p.is_file():
        raise FileNotFoundError(f"Show-o weights not found: {str(p)!r}")
    return p


def load_showo_state_dict(model: nn.Module, path_or_dir: str | os.PathLike, prefix: str = PREFIX) -> Path:
    """Copy every ``prefix + key`` tensor of the file into ``model`` (cast to each parameter's dtype).

    The key set must equal ``model.state_dict()``'s (with ``prefix``) and shapes must match; returns the file read.
    Tensors are read one at a time (``safe_open``) so a 5.8 GB file is never held twice."""
    from safetensors import safe_open

    file = resolve_showo_file(path_or_dir)
    own = model.state_dict()
    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        expected = {prefix + k for k in own}
        unexpected = sorted(k for k in keys if k not in expected)
        if unexpected:
            k = unexpected[0]
            raise ValueError(f"{file}: unexpected key {k!r} (shape {tuple(f.get_slice(k).get_shape())}); "
                             f"{len(unexpected)} unexpected in total")
        present = set(keys)
        missing = [k for k in own if prefix + k not in present]
        if missing:
            raise ValueError(f"{file}: missing key {prefix + missing[0]!r} (model shape {tuple(own[missing[0]].shape)});"
                             f" {len(missing)} missing in total")
        for k, t in own.items():
            shape = tuple(f.get_slice(prefix + k).get_shape())
            if shape != tuple(t.shape):
                raise ValueError(f"{file}: key {prefix + k!r} has shape {shape} in the file but {tuple(t.shape)} "
                                 f"in the model")
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(f.get_tensor(prefix + k).to(t.dtype))
    return file


def save_showo_state_dict(model: nn.Module, path: str | os.PathLike, prefix: str = PREFIX) -> Path:
    """Write ``model.state_dict()`` as safetensors with ``prefix`` keys; atomic (tmp file + ``os.replace``).

    ``path`` may be an existing directory (-> ``path/pytorch_model.safetensors``) or a file path."""
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHT_NAMES[0]
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
