"""Set-up lines for the job log: one line per role with its placement and the time it took to come up.

    rewards: 4 experts on Ray Serve (tier x1, ber x1, der x1, fer x1 replicas; 0.1 CPU, 0 GPU each), ready in 21.4s
    learner: 2 ranks (ZeRO-2), 0.5 CPU + 0 GPU each, group unictask-learner (split, PACK) on 127.0.0.1 x2, ready in 9.0s
    rollout: 1 actor, 0.5 CPU + 0 GPU each, group unictask-rollout (split, PACK) on 127.0.0.1 x1, ready in 6.2s

Serve's own INFO chatter is kept out of the job log by ``RAY_SERVE_LOG_TO_STDERR=0`` (``configs/runtime_env.yaml``,
and ``launch.train`` for local clusters); it still goes to Serve's log files under the Ray session folder.
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)


def _g(x: float) -> str:
    return f"{x:g}"


def _nodes(placement, role: str) -> str:
    """``ip xN`` per node holding the role's bundles (best effort: empty when Ray cannot say)."""
    try:
        import ray
        from ray.util.placement_group import placement_group_table

        slots = placement.plan.slots[role]
        ips = {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"][:8]) for n in ray.nodes()}
        where = Counter()
        for slot in slots:
            table = placement_group_table(placement.groups[slot.group])
            node = table.get("bundles_to_node_id", {}).get(slot.bundle)
            where[ips.get(node, "?")] += 1
        return ", ".join(f"{ip} x{n}" for ip, n in sorted(where.items()))
    except Exception as exc:  # noqa: BLE001 - a log line never fails the set-up
        log.debug("placement of %s not resolved: %s", role, exc)
        return ""


def role_line(role: str, cfg, placement, seconds: float) -> str:
    """One line describing ``role`` ("rewards", "learner", "rollout") of a TrainConfig after it came up."""
    if role == "rewards":
        s = cfg.serve
        parts = []
        for e in s.enabled:
            ec = s.expert(e)
            n = f"{ec.min_replicas}-{ec.max_replicas} (autoscaled)" if ec.autoscale else str(ec.num_replicas)
            parts.append(f"{e} x{n}")
        res = {(_g(s.expert(e).num_cpus), _g(s.expert(e).num_gpus)) for e in s.enabled}
        each = "; ".join(f"{c} CPU, {g} GPU each" for c, g in sorted(res))
        return (f"rewards: {len(s.enabled)} experts on Ray Serve ({', '.join(parts)} replicas; {each}), "
                f"ready in {seconds:.1f}s")
    if role == "learner":
        lc = cfg.learner
        what = f"{lc.num_ranks} ranks (ZeRO-{lc.zero_stage})"
    elif role == "rollout":
        n = cfg.rollout.num_workers
        what = f"{n} actor{'s' if n != 1 else ''}"
    else:
        raise ValueError(f"role_line: unknown role {role!r}")
    slots = placement.plan.slots[role]
    cpus = sorted({_g(x.num_cpus) for x in slots})
    gpus = sorted({_g(x.num_gpus) for x in slots})
    groups = sorted({f"unictask-{x.group}" for x in slots})
    where = _nodes(placement, role)
    return (f"{role}: {what}, {'/'.join(cpus)} CPU + {'/'.join(gpus)} GPU each, group {', '.join(groups)} "
            f"({placement.cfg.layout}, {placement.cfg.strategy})" + (f" on {where}" if where else "")
            + f", ready in {seconds:.1f}s")


def watch_reward_replicas(serve_cfg):
    """Keep the ``reward_serve_replicas`` gauge equal to each expert's running replicas (see
    :func:`actors.serving.metrics.watch_replicas`); returns the event that stops the watcher."""
    from actors.serving import metrics as reward_metrics
    from actors.serving.deploy import replicas

    def running(expert: str) -> int:
        return sum(r["state"] == "RUNNING" for r in replicas(serve_cfg, expert))

    return reward_metrics.watch_replicas(running, list(serve_cfg.enabled))


def concept_checkpoint_lines(model_cfg, concepts: list[str]) -> list[str]:
    """One line per concept naming the concept checkpoint the policy loads (directory, epoch, rows, token strings),
    or a line saying the rows start from their default init. ``concepts`` in any order (e.g. concepts_list.json's):
    they are listed, and their token strings named, in the policy's order, sorted by name
    (:func:`backbone.build.build_policy` adds them that way, so the first sorted concept gets ``<token_0>`` ...)."""
    from backbone.build import _concept_dir
    from backbone.concepts import checkpoint_line, checkpoint_rows, concept_token_strings

    concepts = sorted(concepts)

    if model_cfg.concept_checkpoint_dir is None:
        return [f"concept rows of {', '.join(concepts)}: default init (no model.concept_checkpoint_dir)"]
    strs = concept_token_strings(list(concepts), model_cfg.num_concept_tokens)
    epoch, lines = model_cfg.concept_checkpoint_epoch, []
    for c in concepts:
        directory = _concept_dir(model_cfg, c, len(concepts))
        rows = checkpoint_rows(directory, epoch)
        if rows != len(strs[c]):   # fail in seconds, not after the whole set-up
            raise ValueError(f"concept checkpoint {directory} epoch {epoch} has {rows} rows but the model config asks "
                             f"for {len(strs[c])} (<c> + model.num_understanding_tokens + num_generation_tokens + "
                             "num_stage3_tokens); use the token counts the injection job printed")
        lines.append(checkpoint_line(c, directory, epoch, rows, strs[c]))
    return lines
