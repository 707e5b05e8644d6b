"""Placement groups for the learner and rollout roles (design: split vs colocated layouts).

- ``split``: one placement group per role, one bundle per actor (``{"CPU": c, "GPU": g}``); roles never share.
- ``colocated``: one placement group of ``learner.num_ranks`` shared bundles; bundle i holds learner rank i and the
  rollout actors j with ``j % num_ranks == i``; each bundle has the GPU(s) of one rank and the actors take fractions
  (``learner_gpu_share`` for the learner, the rest split among that bundle's rollout actors).

Before creating anything the request is checked against ``ray.cluster_resources()``; a layout asking for more CPUs
or GPUs than the cluster has raises :class:`PlacementError` naming the role and the numbers. Reward experts are
placed by Ray Serve (``actors/serving/deploy.py``), not here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs.placement import PlacementConfig

log = logging.getLogger(__name__)

_EPS = 1e-9


class PlacementError(ValueError):
    """The requested layout does not fit the cluster (the message names the role and the numbers)."""


@dataclass
class RoleSpec:
    """One role: how many actors and what each one needs."""

    name: str
    count: int
    num_cpus: float
    num_gpus: float


@dataclass
class _Slot:
    """Where one actor goes: placement group name, bundle, and the resources the actor itself requests."""

    group: str
    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass
class LayoutPlan:
    """Bundles per placement group and the slot of every actor of every role (pure data, no Ray)."""

    bundles: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    slots: dict[str, list[_Slot]] = field(default_factory=dict)

    def totals(self) -> dict[str, float]:
        """Total CPU / GPU over all bundles."""
        out = {"CPU": 0.0, "GPU": 0.0}
        for bundles in self.bundles.values():
            for b in bundles:
                for k in out:
                    out[k] += b.get(k, 0.0)
        return out


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A bundle dict without zero entries (Ray rejects empty bundles, so CPU stays at least a sliver)."""
    b = {"CPU": max(float(cpus), 0.0)}
    if gpus > 0:
        b["GPU"] = float(gpus)
    if b["CPU"] <= 0 and "GPU" not in b:
        b["CPU"] = 0.01
    return b


def plan_layout(roles: list[RoleSpec], cfg: PlacementConfig) -> LayoutPlan:
    """Bundles and actor slots for ``roles`` (the first role named 'learner' anchors a colocated layout)."""
    plan = LayoutPlan()
    if cfg.layout == "split":
        for r in roles:
            plan.bundles[r.name] = [_bundle(r.num_cpus, r.num_gpus) for _ in range(r.count)]
            plan.slots[r.name] = [_Slot(r.name, i, r.num_cpus, r.num_gpus) for i in range(r.count)]
        return plan
    if cfg.layout != "colocated":
        raise PlacementError(f"placement.layout must be 'split' or 'colocated', got {cfg.layout!r}")
    if not 0.0 < cfg.learner_gpu_share < 1.0:
        raise PlacementError(f"placement.learner_gpu_share must be in (0, 1), got {cfg.learner_gpu_share}")
    by = {r.name: r for r in roles}
    if "learner" not in by:
        raise PlacementError("placement.layout='colocated' needs a 'learner' role")
    lr = by["learner"]
    n = lr.count
    others = [r for r in roles if r.name != "learner"]
    gpu = max([lr.num_gpus] + [r.num_gpus for r in others])
    gpu = float(max(1.0, round(gpu))) if gpu > 0 else 0.0
    cpu = [lr.num_cpus] * n
    per_bundle: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    for r in others:
        for j in range(r.count):
            per_bundle[j % n].append((r.name, j))
            cpu[j % n] += r.num_cpus
    name = "colocated"
    plan.bundles[name] = [_bundle(cpu[i], gpu) for i in range(n)]
    plan.slots["learner"] = [_Slot(name, i, lr.num_cpus, gpu * cfg.learner_gpu_share if gpu else 0.0)
                             for i in range(n)]
    for r in others:
        plan.slots[r.name] = [None] * r.count  # type: ignore[list-item]
    for i, members in enumerate(per_bundle):
        for role, j in members:
            share = gpu * (1.0 - cfg.learner_gpu_share) / len(members) if gpu else 0.0
            plan.slots[role][j] = _Slot(name, i, by[role].num_cpus, share)
    return plan


def check_fits(plan: LayoutPlan, roles: list[RoleSpec], layout: str, cluster: dict[str, float]) -> None:
    """Raise PlacementError when a role alone, or the whole layout, needs more CPU/GPU than ``cluster`` has."""
    have = {k: float(cluster.get(k, 0.0)) for k in ("CPU", "GPU")}
    for r in roles:
        need = {"CPU": r.count * r.num_cpus, "GPU": r.count * r.num_gpus}
        for k in ("CPU", "GPU"):
            if need[k] > have[k] + _EPS:
                raise PlacementError(
                    f"placement ({layout}): role '{r.name}' needs {r.count} × {{CPU: {r.num_cpus:g}, GPU: "
                    f"{r.num_gpus:g}}} = {need[k]:g} {k}, but the cluster has {have[k]:g} {k}")
    total = plan.totals()
    for k in ("CPU", "GPU"):
        if total[k] > have[k] + _EPS:
            parts = ", ".join(f"{r.name} {r.count}×{{CPU {r.num_cpus:g}, GPU {r.num_gpus:g}}}" for r in roles)
            raise PlacementError(f"placement ({layout}): the roles together need {total[k]:g} {k} ({parts}), "
                                 f"but the cluster has {have[k]:g} {k}")


def roles_from_config(cfg: Any) -> list[RoleSpec]:
    """Learner and rollout roles from a TrainConfig (``learner.*`` and ``rollout.*`` resources)."""
    return [RoleSpec("learner", int(cfg.learner.num_ranks), float(cfg.learner.num_cpus_per_rank),
                     float(cfg.learner.num_gpus_per_rank)),
            RoleSpec("rollout", int(cfg.rollout.num_workers), float(cfg.rollout.num_cpus),
                     float(cfg.rollout.num_gpus))]


class RolePlacement:
    """Creates the placement groups for a config and hands out actor options per role and index."""

    def __init__(self, cfg: Any = None, roles: list[RoleSpec] | None = None,
                 placement: PlacementConfig | None = None):
        """``cfg``: TrainConfig (roles from ``learner``/``rollout``; ``cfg.placement`` if present), or pass
        ``roles`` and ``placement`` directly. Checks the cluster first, then creates and waits (bounded)."""
        self.cfg = placement or getattr(cfg, "placement", None) or PlacementConfig()
        self.roles = roles if roles is not None else roles_from_config(cfg)
        self.plan = plan_layout(self.roles, self.cfg)
        check_fits(self.plan, self.roles, self.cfg.layout, ray.cluster_resources())
        self.groups: dict[str, Any] = {}
        try:
            for name, bundles in self.plan.bundles.items():
                if bundles:
                    self.groups[name] = placement_group(bundles, strategy=self.cfg.strategy,
                                                        name=f"unictask-{name}")
            for name, pg in self.groups.items():
                ready, _ = ray.wait([pg.ready()], timeout=self.cfg.ready_timeout_s)
                if not ready:
                    raise PlacementError(
                        f"placement ({self.cfg.layout}): group '{name}' ({len(self.plan.bundles[name])} bundles, "
                        f"{self.plan.bundles[name][0]} each) not scheduled within {self.cfg.ready_timeout_s:g}s; "
                        f"available now: {ray.available_resources()}")
        except BaseException:
            self.remove()
            raise

    def options(self, role: str, index: int) -> dict:
        """``ActorClass.options(**...)`` for actor ``index`` of ``role``."""
        if role not in self.plan.slots:
            raise PlacementError(f"placement: unknown role {role!r} (have {sorted(self.plan.slots)})")
        slots = self.plan.slots[role]
        if not 0 <= index < len(slots):
            raise PlacementError(f"placement: role {role!r} has {len(slots)} slots, asked for index {index}")
        s = slots[index]
        return {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.groups[s.group], placement_group_bundle_index=s.bundle,
                    placement_group_capture_child_tasks=False)}

    def learner_options(self, rank: int) -> dict:
        """Actor options of learner rank ``rank``."""
        return self.options("learner", rank)

    def rollout_options(self, index: int) -> dict:
        """Actor options of rollout actor ``index``."""
        return self.options("rollout", index)

    def remove(self) -> None:
        """Release the placement groups (actors in them die)."""
        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self.groups = {}
