"""Benchmark: does the service use the hardware it is given? (``python -m launch.bench.step --scaling``)

- **continuous batching** (launch/bench/continuous.py): one actor's rollout phase with the continuous engine
  against the lock-step one, without and with an injected service time per screen / reward call.
- **group sharding**: the rollout phase of one group of G = 8 (tiny config, CPU, each rollout actor one torch
  thread, the reward experts on Ray Serve) on 1 and on 2 rollout actors, through ``actors.driver.dispatch.GroupDispatcher``
  with shards of 1 and of 4 samples, and the pre-sharding baseline (the whole group in one request on one actor).
  The figure is the best 2-actor setting against the best 1-actor setting. Runs interleaved (1, 2, 1, 2, ...) so load drifts hit both alike; medians.
- **overlap**: steps/s of the whole service (``actors.driver.trainer.Trainer.train_step``: rollout, DeepSpeed update,
  weight sync; 2 learner ranks, 1 rollout actor, Ray Serve rewards) with ``run.overlap: one_step`` against
  ``none``: one trainer runs blocks of steps in each mode in turn (so load drifts hit both alike); an overlapped
  block's first step fills the pipeline and is not timed; medians of the other steps.
- **units per forward**: the learner's replay (``actors.learner.step.run_units``: forward + backward of every
  MaskGIT step of the group, the frozen reference included) in process, tokens/s for ``learner.units_per_forward``
  = 1, 2, 4, 8, interleaved; the figure is the best setting against 1.

Printed: Markdown tables, then one ``NAME: VALUE`` line per figure (last lines of the output).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time

GROUP_SIZE = 8
UNITS = (1, 2, 4, 8)
SHARDS = (1, 4)
BEFORE = "1 actor, whole group per request (before)"


def _rollout_workers(cfg, n: int) -> list:
    """``n`` rollout actors, one CPU and one torch thread each, with the config's (seeded, identical) weights."""
    import ray

    from actors.rollout.worker import RolloutWorker, actor_options
    from configs.schema import config_to_dict

    opts = dict(num_cpus=1, num_gpus=0, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
                **actor_options(cfg))
    workers = [RolloutWorker.options(**opts).remote(config_to_dict(cfg), i) for i in range(n)]
    ray.get([w.ready.remote() for w in workers])
    return workers


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (the private Ray cluster's processes:
    rollout actors, Serve replicas, raylet, GCS) so far."""
    import psutil

    total = 0.0
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_group_sharding(cfg, repeats: int, log=print) -> dict:
    """Seconds of the rollout phase of one group (median of ``repeats``) per setting; needs a running Ray."""
    import ray

    from actors.driver.dispatch import GroupDispatcher
    from actors.rollout.engine import GroupRequest
    from actors.serving.deploy import deploy_rewards, shutdown_rewards

    deploy_rewards(cfg.serve, data_root=cfg.data.root)
    workers = _rollout_workers(cfg, 2)
    try:
        settings = {BEFORE: (1, 0)}
        for per in SHARDS:
            settings.update({f"1 actor, shards of {per}": (1, per), f"2 actors, shards of {per}": (2, per)})
        from rl.data.reader import load_dataset

        concept = sorted(load_dataset(cfg.data).concepts)[0]
        req = GroupRequest(step=0, prompt_index=0, concept=concept, threshold=None)
        calib = GroupDispatcher(workers[:1], group_size=GROUP_SIZE, samples_per_request=0, dsog=cfg.dsog)
        threshold = calib.run([req])[0].init_threshold   # a calibrated threshold: the measured runs redraw
        req = dataclasses.replace(req, threshold=threshold)
        times: dict[str, list[float]] = {k: [] for k in settings}
        cores: dict[str, list[float]] = {k: [] for k in settings}
        for r in range(repeats + 1):   # round 0 warms every actor and the Serve handles up
            for name, (n, shard) in settings.items():
                per_actor = dataclasses.replace(cfg.rollout, samples_per_request=shard).inflight_shards(GROUP_SIZE)
                d = GroupDispatcher(workers[:n], group_size=GROUP_SIZE, samples_per_request=shard, dsog=cfg.dsog,
                                    per_actor=per_actor)
                t0, c0 = time.perf_counter(), cpu_seconds()
                d.run([dataclasses.replace(req, step=r)])
                if r:
                    times[name].append(time.perf_counter() - t0)
                    cores[name].append((cpu_seconds() - c0) / times[name][-1])
            log(f"group sharding round {r}: " + ", ".join(f"{v[-1]:.2f}s" for v in times.values() if v))
        out = {k: statistics.median(v) for k, v in times.items()}
        out["cores"] = {k: statistics.median(v) for k, v in cores.items()}
        return out
    finally:
        for w in workers:   # our own actors, by handle
            ray.kill(w)
        shutdown_rewards(cfg.serve)   # the overlap benchmark's trainer deploys its own


OVERLAP_BLOCK = 3
"""Steps per block of one mode in the overlap benchmark."""


def bench_overlap(cfg, repeats: int, log=print) -> dict:
    """Seconds per step (median) for run.overlap none and one_step, on one set-up trainer; needs a running Ray."""
    import copy

    from actors.driver.trainer import Trainer

    tcfg = copy.deepcopy(cfg)
    tcfg.run.steps, tcfg.run.image_grid_every, tcfg.run.name = 2 * OVERLAP_BLOCK * repeats, 0, "bench-overlap"
    trainer = Trainer(tcfg)
    times: dict[str, list[float]] = {"none": [], "one_step": []}
    phases: dict[str, list[float]] = {"rollout": [], "learn": [], "sync": []}
    try:
        trainer.setup()
        step = 0
        for r in range(repeats):
            for mode in ("none", "one_step"):
                trainer.cfg.run.overlap = mode   # same trainer, same config otherwise: only the schedule differs
                for i in range(OVERLAP_BLOCK):
                    t0 = time.perf_counter()
                    metrics = trainer.train_step(step)
                    if mode == "none" or i > 0:   # an overlapped block's first step fills the pipeline
                        times[mode].append(time.perf_counter() - t0)
                    if mode == "none":
                        for k in phases:
                            phases[k].append(metrics[f"time/{k}"])
                    step += 1
            log(f"overlap round {r}: none {statistics.median(times['none']):.2f}s/step, one_step "
                f"{statistics.median(times['one_step']):.2f}s/step")
    finally:
        trainer.shutdown()
    out = {k: statistics.median(v) for k, v in times.items()}
    out["phases"] = {k: statistics.median(v) for k, v in phases.items()}
    return out


def _group_samples(cfg):
    """One group of G samples from an in-process engine (local reward experts), advantages filled."""
    import numpy as np
    import torch

    from actors.learner.step import make_showo_backend
    from actors.rollout.engine import GroupRequest, RolloutEngine
    from actors.rollout.scoring import local_scorer
    from rl.data.reader import load_dataset

    ds = load_dataset(cfg.data)
    backend = make_showo_backend(cfg, torch.device("cpu"))
    engine = RolloutEngine(cfg, backend.policy, ds, local_scorer(cfg, ds))
    req = GroupRequest(step=0, prompt_index=0, concept=sorted(ds.concepts)[0], threshold=None)
    samples = engine.generate_group(req).samples
    rewards = np.array([s.reward for s in samples])
    for s, r in zip(samples, rewards):
        s.advantage = float(r - rewards.mean()) or 1e-3
    return backend, samples


def bench_units_per_forward(cfg, repeats: int, log=print) -> dict:
    """Image tokens replayed per second (forward + backward, reference included) per units_per_forward."""
    from actors.learner.step import run_units, schedule_units

    backend, samples = _group_samples(cfg)
    units = [u for u in schedule_units(samples, 1, 0.0)[0] if u.kind == "image"]
    tokens = sum(int(samples[u.sample].states.shape[1]) for u in units)
    times: dict[int, list[float]] = {k: [] for k in UNITS}
    for r in range(repeats + 1):
        for k in UNITS:
            backend.module.zero_grad(set_to_none=True)
            backend.begin_step()
            t0 = time.perf_counter()
            run_units(backend.module, lambda loss: loss.backward(), backend, samples, units, 1, units_per_forward=k)
            if r:
                times[k].append(time.perf_counter() - t0)
        log(f"units per forward round {r}: " + ", ".join(f"{k}: {v[-1]:.2f}s" for k, v in times.items() if v))
    return {k: tokens / statistics.median(v) for k, v in times.items()}


def render(shard: dict, upf: dict, overlap: dict, cfg, cont: dict, service_s: float) -> tuple[str, list[str]]:
    """(Markdown tables, ``NAME: VALUE`` lines). The sharding figure: the best 2-actor setting against the best
    1-actor setting (whole group or shards)."""
    cores = shard.pop("cores", {})
    one = min(v for k, v in shard.items() if k.startswith("1 actor"))
    two_name = min((k for k in shard if k.startswith("2 actors")), key=shard.get)
    d = cfg.dsog
    from launch.bench import continuous

    cont_table, cont_figures = continuous.render(cont, cfg, service_s)
    lines = [cont_table, "",
             f"Group sharding: rollout phase of one group, G = {GROUP_SIZE}, T = {cfg.sampler.timesteps}, DSOG at "
             f"step {d.screen_step} (≤ {d.max_attempts} attempts, calibrated threshold), tiny config on CPU, each "
             f"rollout actor 1 torch thread (rollout.engine {cfg.rollout.engine}), reward experts on Ray Serve; "
             "medians of interleaved runs. CPU cores busy: CPU seconds of the whole cluster (actors, Serve replicas, "
             "Ray) per wall second.", "",
             "| setting | seconds | CPU cores busy | speed-up vs the whole group on 1 actor |", "|---|---|---|---|"]
    for name, sec in shard.items():
        busy = f"{cores[name]:.2f}" if name in cores else "n/a"
        lines.append(f"| {name} | {sec:.2f} | {busy} | {shard[BEFORE] / sec:.2f}× |")
    lines += ["", f"Overlap: whole GRPO steps (G = {cfg.rollout.group_size}, T = {cfg.sampler.timesteps}, "
              f"{cfg.learner.num_ranks} DeepSpeed learner ranks, {cfg.rollout.num_workers} rollout actor(s), Ray "
              f"Serve rewards), blocks of {OVERLAP_BLOCK} steps per mode in turn; medians.", "",
              "| run.overlap | seconds per step | steps/s | speed-up vs none |", "|---|---|---|---|"]
    for mode in ("none", "one_step"):
        sec = overlap[mode]
        lines.append(f"| {mode} | {sec:.2f} | {1 / sec:.3f} | {overlap['none'] / sec:.2f}× |")
    ph = overlap.get("phases")
    if ph:   # the ceiling: the shorter of rollout and update hidden entirely
        bound = (ph["rollout"] + ph["learn"] + ph["sync"]) / (max(ph["rollout"], ph["learn"]) + ph["sync"])
        lines += ["", f"Sequential phases (medians): rollout {ph['rollout']:.2f} s, update {ph['learn']:.2f} s, sync "
                  f"{ph['sync']:.2f} s; hiding the shorter phase entirely would give {bound:.2f}×."]
    lines += ["", f"Learner replay, one group (G = {GROUP_SIZE} × T = {cfg.sampler.timesteps} image units), in "
              "process, forward + backward incl. the frozen reference; medians of interleaved runs.", "",
              "| units per forward | image tokens/s | speed-up vs 1 |", "|---|---|---|"]
    for k, tps in upf.items():
        lines.append(f"| {k} | {tps:.0f} | {tps / upf[1]:.2f}× |")
    best = max(upf, key=upf.get)
    lines += ["", f"Figures: group sharding = {two_name} against the best 1-actor setting; units per forward = "
              f"{best} against 1."]
    figures = cont_figures + [f"group-sharding speed-up: {one / shard[two_name]:.2f}×",
               f"overlap speed-up: {overlap['none'] / overlap['one_step']:.2f}×",
               f"units-per-forward speed-up: {upf[best] / upf[1]:.2f}×"]
    return "\n".join(lines), figures


def run_scaling(cfg, repeats: int, threads: int, log=print, service_s: float = 0.25) -> str:
    """The four benchmarks (Ray started here unless one is running); returns the Markdown + figure lines."""
    import ray
    import torch

    from actors.cluster.ray_env import start_local_ray
    from launch.bench.continuous import bench_continuous

    cont = bench_continuous(cfg, repeats, service_s, log)

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    try:
        shard = bench_group_sharding(cfg, repeats, log)
        overlap = bench_overlap(cfg, repeats, log)
    finally:
        if started:
            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            ray.shutdown()
    torch.set_num_threads(threads)
    upf = bench_units_per_forward(cfg, repeats, log)
    tables, figures = render(shard, upf, overlap, cfg, cont, service_s)
    return tables + "\n\n" + "\n".join(figures)
