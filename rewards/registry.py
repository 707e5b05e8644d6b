"""Expert registry: ``build_expert(name, config)`` and the config class of each expert.

Modules are imported lazily, so building TIER never imports open_clip or facenet.
"""
from __future__ import annotations

import dataclasses
import importlib

from rewards.base import ExpertConfig, RewardExpert

__all__ = ["EXPERTS", "expert_names", "config_class", "build_expert"]

EXPERTS: dict[str, tuple[str, str, str]] = {
    "tier": ("rewards.tier", "TierExpert", "TierConfig"),
    "ber": ("rewards.ber", "BerExpert", "BerConfig"),
    "der": ("rewards.der", "DerExpert", "DerConfig"),
    "fer": ("rewards.fer", "FerExpert", "FerConfig"),
    "clip": ("rewards.clip_score", "ClipExpert", "ClipConfig"),
    "unipercept": ("rewards.unipercept", "UniPerceptExpert", "UniPerceptConfig"),
}
"""expert name -> (module, expert class, config class)."""


def expert_names() -> list[str]:
    """Names ``build_expert`` accepts."""
    return list(EXPERTS)


def _lookup(name: str, which: int) -> type:
    if name not in EXPERTS:
        raise ValueError(f"unknown reward expert {name!r}; known: {expert_names()}")
    module = importlib.import_module(EXPERTS[name][0])
    return getattr(module, EXPERTS[name][which])


def config_class(name: str) -> type[ExpertConfig]:
    """The config dataclass of expert ``name`` (e.g. ``config_class("der") is DerConfig``)."""
    return _lookup(name, 2)


def build_expert(name: str, config: ExpertConfig | dict | str | None = None, python: str | None = None
                 ) -> RewardExpert:
    """Build expert ``name`` from its config: an instance, a dict of fields, "tiny", or None (real defaults).

    ``python``: build it in that interpreter instead (a :class:`rewards.process_expert.ProcessExpert`, e.g. UniPercept
    in its overlay environment; relative paths are from the repository root); the interpreter is checked first.
    """
    cfg_cls = config_class(name)
    if config is None:
        config = cfg_cls()
    elif config == "tiny":
        config = cfg_cls.tiny()
    elif isinstance(config, dict):
        known = {f.name for f in dataclasses.fields(cfg_cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{name}: unknown config field(s) {unknown}; known: {sorted(known)}")
        config = cfg_cls(**config)
    elif not isinstance(config, cfg_cls):
        raise ValueError(f"{name}: expected a {cfg_cls.__name__}, got {type(config).__name__}")
    if python:
        from rewards.expert_env import check_python, resolve_python
        from rewards.process_expert import ProcessExpert

        interpreter = resolve_python(python)
        check_python(interpreter, name)
        return ProcessExpert(name, config, interpreter)
    return _lookup(name, 1)(config)
