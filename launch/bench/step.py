"""Benchmark: one GRPO training step by phase, peak memory per role, and three baselines, as Markdown tables.

    python -m launch.bench.step                        # tiny config, CPU, every role on a local loopback Ray
    python -m launch.bench.step --steps 5 --out bench_step.md rollout.group_size=8    # config overrides
    python -m launch.bench.step --real-shapes          # Show-o 512 shapes, random weights, one GPU

Step: ``Trainer.train_step`` (actors/driver/trainer.py) after ``--warmup`` steps, medians over ``--steps`` steps. Rollout
sub-phases are rollout-actor seconds (answer IR, MaskGIT incl. the DSOG preview decode, DSOG screen calls, reward
calls); learn splits into replay (slowest rank), optimizer step and Ray/DeepSpeed overhead. Memory per role: peak
RSS (VmHWM, reset before the measured steps) of the driver and of every Ray process it started, plus the actors'
``torch.cuda.max_memory_allocated`` on GPU.

Baselines, in the driver after the Ray roles are gone (``--threads`` torch threads, like a tiny rollout actor):
(a) launch/bench/rollout's reference loop (full recompute, full-vocab logits, sequential CFG, eager attention) vs
    the service's sampler on a freshly generated group's compound prompts, seconds per image;
(b) that group's reward and DSOG-screen calls replayed on in-process experts (actors.rollout.scoring.local_scorer) as the
    engine batched them vs one sample per call (the served path: ``--serve`` runs launch/bench/serve);
(c) learner memory: keep k MaskGIT steps' graphs (sum the unit losses, one backward) vs per-step backward
    (actors.learner.step.run_units), k = 1, 2, 4: peak memory delta and bytes saved for backward, a linear fit
    per kept step extrapolated to T. Real shapes (T = 50) come from a meta-device pass (shapes only: no memory,
    no arithmetic) that reproduces the measured bytes at the measured shapes; ``--real-shapes`` measures on GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from launch.bench.memory import (
    KEEP,
    KS,
    MIB,
    PER_STEP,
    fit,
    learner_memory,
    meta_saved_per_step,
    proc_kb,
    real_shape_saved_per_step,
    reset_peak_rss,
)

REAL_OVERRIDES = [  # one GPU: learner rank + rollout actor share it (colocated, gloo sync); experts stay tiny
    "model.preset=real", "model.random_init=true", "model.tokenizer_path=builtin:tiny", "model.dtype=bfloat16",
    "sampler.timesteps=50", "dsog.screen_step=10", "dsog.max_attempts=4", "rollout.group_size=9",
    "rollout.answer_max_new_tokens=100", "objective.max_answer_tokens=100", "rollout.num_gpus=1",
    "rollout.num_cpus=2", "rollout.group_timeout_s=3600", "learner.num_ranks=1", "learner.num_gpus_per_rank=1",
    "learner.num_cpus_per_rank=2", "learner.collective_timeout_s=1800", "placement.layout=colocated",
    "placement.ready_timeout_s=120", "sync.backend=gloo", "sync.bucket_mb=256", "sync.timeout_s=600",
    "ray.num_gpus=1"]


def bench_config(real_shapes: bool, overrides=(), output_root: str | None = None):
    """configs/tiny_cpu.yaml (+ REAL_OVERRIDES) + ``overrides``, absolute paths, sample data made if missing."""
    from configs.schema import load_config
    from launch.train import prepare

    real = REAL_OVERRIDES + [f"ray.num_cpus={os.cpu_count()}"] if real_shapes else []
    root = [f"run.output_root={output_root}"] if output_root else []
    cfg = load_config("tiny_cpu", ["run.tensorboard=false", "run.name=bench-step", *root, *real, *overrides])
    prepare(cfg)
    return cfg


def machine() -> str:
    """CPU model, cores, RAM, GPU, torch, load."""
    import psutil
    import torch

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}; torch "
            f"{torch.__version__}; load average {os.getloadavg()[0]:.1f} at the start")


def describe(cfg) -> str:
    """The benchmarked setting in words."""
    m, d = cfg.model, cfg.dsog
    dsog = f"DSOG at step {d.screen_step}, ≤{d.max_attempts} attempts" if d.enabled else "DSOG off"
    return (f"{m.preset} shapes ({'random init' if m.random_init else 'weights'}, {m.dtype}), "
            f"{cfg.run.prompts_per_step} prompt(s) × G={cfg.rollout.group_size}, T={cfg.sampler.timesteps}, {dsog}, "
            f"{cfg.rollout.num_workers} rollout actor(s), {cfg.learner.num_ranks} learner rank(s) "
            f"(ZeRO-{cfg.learner.zero_stage}), experts {', '.join(cfg.serve.enabled)} on Ray Serve")


# ----------------------------------------------------------------------------------------------- the step
def role_of(title: str) -> str:
    """Role of a Ray process from its title, e.g. ``ray::RolloutWorker.generate_group`` -> rollout actor."""
    for prefix, role in (("ray::RolloutWorker", "rollout actor"), ("ray::LearnerWorker", "learner rank"),
                         ("ray::ServeController", "Serve controller + proxy"),
                         ("ray::ProxyActor", "Serve controller + proxy")):
        if title.startswith(prefix):
            return role
    if title.startswith("ray::ServeReplica:"):
        return "reward replica " + title.split(":")[-1].split()[0].split(".")[0].replace("reward-", "")
    return "Ray system (GCS, raylet, agents, idle workers)"


def ray_processes() -> dict[int, str]:
    """pid -> role of the driver and every process it started (a joined cluster's processes are not ours)."""
    import psutil

    out = {os.getpid(): "driver"}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out[p.pid] = role_of(" ".join(p.cmdline()) or p.name())
    return out


def _cuda_peak(actor_self, reset: bool):
    """Inside an actor via ``__ray_call__``: (pid, peak CUDA bytes or None), then reset the peak if asked."""
    import torch

    if not torch.cuda.is_available():
        return os.getpid(), None
    peak = torch.cuda.max_memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return os.getpid(), peak


def actor_cuda_peaks(trainer, reset: bool) -> dict[int, int]:
    """pid -> peak CUDA bytes of the rollout actors and learner ranks (empty on CPU)."""
    import ray

    handles = list(trainer.workers) + list(trainer.learners.workers)
    with contextlib.suppress(Exception):
        refs = [h.__ray_call__.remote(_cuda_peak, reset) for h in handles]
        return {pid: b for pid, b in ray.get(refs, timeout=120) if b is not None}
    return {}


@dataclass
class StepRun:
    """Metrics of the measured steps, memory rows per role, set-up seconds."""

    history: list[dict]
    """Trainer.train_step metrics of the measured steps."""
    memory: list[dict]
    """Rows per role: role, processes, peak_rss_mib, rss_mib, peak_cuda_mib (None on CPU)."""
    setup_s: float
    """Seconds of Trainer.setup (deployments, actors, first sync)."""


def measure_steps(cfg, warmup: int = 1, steps: int = 3, log=print) -> StepRun:
    """A Trainer on the running Ray cluster: set up, ``warmup`` + ``steps`` steps, peak memory per role."""
    from actors.driver.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        setup_s = time.perf_counter() - t0
        log(f"set-up {setup_s:.1f} s")
        for s in range(warmup):
            trainer.train_step(s)
        procs = ray_processes()
        for pid in procs:
            reset_peak_rss(pid)
        actor_cuda_peaks(trainer, reset=True)
        history = []
        for s in range(warmup, warmup + steps):
            history.append(trainer.train_step(s))
            log(f"step {s}: {history[-1]['time/step']:.2f} s")
        cuda = actor_cuda_peaks(trainer, reset=False)
        roles: dict[str, dict] = {}
        for pid, role in procs.items():
            r = roles.setdefault(role, {"role": role, "processes": 0, "peak_rss_mib": 0.0, "rss_mib": 0.0,
                                        "peak_cuda_mib": None})
            r["processes"] += 1
            r["peak_rss_mib"] += proc_kb(pid, "VmHWM") / 1024
            r["rss_mib"] += proc_kb(pid, "VmRSS") / 1024
            if pid in cuda:
                r["peak_cuda_mib"] = (r["peak_cuda_mib"] or 0.0) + cuda[pid] / MIB
        return StepRun(history, sorted(roles.values(), key=lambda r: r["role"]), setup_s)
    finally:
        trainer.shutdown()


def median(history: list[dict], key: str) -> float:
    """Median of a metric over the steps (NaN when absent)."""
    vals = [m[key] for m in history if key in m and np.isfinite(m[key])]
    return statistics.median(vals) if vals else float("nan")


def phase_rows(history: list[dict]) -> list[dict]:
    """Rows (phase, seconds, share %, min–max, note) of the step, medians over ``history``."""
    step, rows = median(history, "time/step"), []

    def add(name, sec, note="", key=None):
        vals = [m.get(key, 0.0) for m in history] if key else []
        rows.append({"phase": name, "seconds": sec, "share": 100 * sec / step, "note": note,
                     "range": f"{min(vals):.3f}–{max(vals):.3f}" if vals else "-"})

    rollout, learn, sync = (median(history, f"time/{k}") for k in ("rollout", "learn", "sync"))
    subs = {"answer": "· answer IR", "image": "· MaskGIT image (incl. preview decode)", "screen": "· DSOG screen",
            "reward": "· reward scoring (served)"}
    vals = {k: np.nan_to_num(median(history, f"time/{k}")) for k in subs}
    actor = [sum(np.nan_to_num(m.get(f"time/{k}", 0.0)) for k in subs) for m in history]   # per step
    ratio = statistics.median(a / m["time/rollout"] for a, m in zip(actor, history))
    scale = 1.0 if ratio <= 1.05 else 1.0 / ratio   # several actors at once: attribute the wall proportionally
    add("rollout (wall)", rollout, "answer IR → CP → MaskGIT + DSOG → rewards", "time/rollout")
    for k, name in subs.items():
        add(name, vals[k] * scale, "actor seconds" + ("" if scale == 1 else f" × {scale:.2f} (parallel actors)"),
            f"time/{k}")
    add("· dispatch / transfer / prompts", statistics.median(max(m["time/rollout"] - a * scale, 0.0)
                                                             for a, m in zip(actor, history)),
        "rollout wall − actor seconds")
    replay, optim = median(history, "learn/replay_s"), median(history, "learn/optim_s")
    add("learn (wall)", learn, f"{median(history, 'learn/units_per_rank'):.0f} replay units per rank", "time/learn")
    add("· replay forward + backward", replay, "slowest rank", "learn/replay_s")
    add("· optimizer step", optim, "slowest rank", "learn/optim_s")
    add("· Ray / DeepSpeed overhead", max(learn - replay - optim, 0.0), "learn wall − replay − optimizer")
    add("weight sync", sync, "rank 0 → rollout actors, bucketed broadcast", "time/sync")
    add("driver (advantages, DSOG update)", max(step - rollout - learn - sync, 0.0))
    add("**step**", step, "", "time/step")
    return rows


# ----------------------------------------------------------------------------------------------- baselines
class RecordingScorer:
    """A rollout Scorer that records every screen/score call's arguments, then delegates."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def screen(self, *args):
        """Record, then the inner scorer's DSOG screen."""
        self.calls.append(("screen", args))
        return self.inner.screen(*args)

    def score(self, *args):
        """Record, then the inner scorer's reward call."""
        self.calls.append(("score", args))
        return self.inner.score(*args)


@dataclass
class InProcess:
    """Driver-side policy, recording scorer and one generated group (with advantages): the baselines' inputs."""

    cfg: object
    """The benchmarked TrainConfig."""
    policy: object
    """backbone.build.Policy built from cfg.model."""
    scorer: RecordingScorer
    """Its calls: the recorded group's screen and reward calls."""
    samples: list
    """The recorded group's RolloutSamples (advantages filled)."""
    device: str
    """cpu or cuda."""


def inprocess_group(cfg, device: str = "cpu") -> InProcess:
    """Policy (same config + seed as the service) and in-process experts; one warm-up group, one recorded group."""
    from actors.learner.step import concept_specs
    from actors.rollout.engine import GroupRequest, RolloutEngine
    from actors.rollout.scoring import local_scorer
    from backbone.build import build_policy
    from rl.data.reader import load_dataset
    from rl.grpo.objective import group_advantages

    dataset = load_dataset(cfg.data)
    policy = build_policy(cfg.model, concept_specs(dataset), device=device)
    policy.model.eval()
    scorer = RecordingScorer(local_scorer(cfg, dataset))
    engine = RolloutEngine(cfg, policy, dataset, scorer, device=device)
    req = GroupRequest(step=0, prompt_index=0, concept=sorted(dataset.concepts)[0], threshold=None)
    engine.generate_group(req)
    scorer.calls.clear()
    samples = engine.generate_group(req).samples
    for s, a in zip(samples, group_advantages(np.array([s.reward for s in samples]))):
        s.advantage = float(a)
    return InProcess(cfg, policy, scorer, samples, device)


def samples_t2i(samples):
    """T2IInputs of RolloutSamples' compound prompts (as the learner rebuilds them)."""
    import torch

    from backbone.prompts import T2IInputs

    n = int(samples[0].states.shape[1])
    ids = torch.from_numpy(np.stack([s.t2i_input_ids for s in samples]))
    uncond = torch.from_numpy(np.stack([s.uncond_input_ids for s in samples]))
    return T2IInputs(input_ids=ids, uncond_input_ids=uncond, text_len=int(ids.shape[1]) - n - 2,
                     num_image_tokens=n, truncated=[s.prompt_cut for s in samples])


def interleaved(fns: dict, repeats: int, sync=None) -> dict[str, float]:
    """Median seconds of each function, runs interleaved (a, b, a, b, ...) after one warm-up each, so that a
    shared machine's changing load hits every method alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_sampler(ip: InProcess, repeats: int = 5) -> dict:
    """(a) seconds per image of the service's sampler and of the reference loop (same prompts, seeds, weights)."""
    import torch

    from launch.bench.rollout import reference_generate, sampler_generate
    from rl.grpo.seeding import make_generator

    t2i, (T, g), ids = samples_t2i(ip.samples), (ip.cfg.sampler.timesteps, ip.cfg.sampler.guidance_scale), {}

    def run(name, fn):
        gens = [make_generator(1000 + i, device=ip.device) for i in range(len(ip.samples))]
        ids[name] = fn(ip.policy.model, ip.policy.tok, t2i, gens, T, g).cpu()

    sec = interleaved({"sampler": lambda: run("sampler", sampler_generate),
                       "reference": lambda: run("reference", reference_generate)}, repeats,
                      torch.cuda.synchronize if ip.device.startswith("cuda") else None)
    return {"sampler": sec["sampler"] / len(ip.samples), "reference": sec["reference"] / len(ip.samples),
            "same": float((ids["sampler"] == ids["reference"]).float().mean()), "batch": len(ip.samples), "T": T,
            "tokens": t2i.num_image_tokens}


def bench_reward_calls(ip: InProcess, repeats: int = 5) -> dict:
    """(b) seconds of the group's recorded screen + reward calls: as batched vs one sample per call."""
    calls, inner = ip.scorer.calls, ip.scorer.inner

    def batched():
        for kind, args in calls:
            getattr(inner, kind)(*args)

    def single():
        for kind, args in calls:
            for i in range(len(args[1])):
                getattr(inner, kind)(*(a[i:i + 1] for a in args))

    sec = interleaved({"batched": batched, "single": single}, repeats)
    return dict(sec, calls=len(calls), samples=sum(len(a[1]) for _, a in calls),
                screen_calls=sum(k == "screen" for k, _ in calls))


# ----------------------------------------------------------------------------------------------- tables
def render_step(run: StepRun, cfg, memory: bool = True) -> str:
    """Phase table, throughput / DSOG lines and the memory-per-role table."""
    from launch.bench.rewards import markdown_table as table

    h = run.history
    out = [f"**One GRPO step by phase**: {describe(cfg)}; median of {len(h)} steps after warm-up (set-up "
           f"{run.setup_s:.0f} s, not in the step)", "",
           table(phase_rows(h), [("phase", "phase", ""), ("seconds", "seconds", ".3f"), ("share", "share %", ".1f"),
                                 ("range", "min–max", ""), ("note", "note", "")]), "",
           f"- images/s: **{median(h, 'throughput/images_per_s'):.2f}** ({median(h, 'throughput/images'):.0f} kept "
           f"images per step)",
           f"- DSOG attempts per kept sample: **{median(h, 'dsog/attempts_per_sample'):.2f}** (pass rate "
           f"{median(h, 'dsog/pass_rate'):.2f}, forced keeps {median(h, 'dsog/forced_keeps'):.0f} per step)"]
    if memory and run.memory:
        cols = [("role", "role", ""), ("processes", "processes", "d"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
                ("rss_mib", "RSS at end MiB", ".0f")]
        if any(r["peak_cuda_mib"] is not None for r in run.memory):
            cols.append(("peak_cuda_mib", "peak CUDA MiB", ".0f"))
        out += ["", "**Peak memory per role during the measured steps** (RSS summed over the role's processes; "
                "shared pages such as the torch libraries count in every process)", "", table(run.memory, cols)]
    return "\n".join(out)


def render_baselines(history, a: dict, b: dict, mem: list[dict], real: dict, meta_here: int, T: int) -> str:
    """Baselines (a)-(c) with ratios and, when a step was measured, their projected effect on it."""
    from launch.bench.rewards import markdown_table as table

    h = history or []
    step, image = median(h, "time/step"), median(h, "time/image")
    rew = median(h, "time/reward") + median(h, "time/screen")
    ra, rb = a["reference"] / a["sampler"], b["single"] / b["batched"]
    ks, ki = fit(mem, KEEP)
    flat = max(r["peak_mib"] for r in mem if r["mode"] == PER_STEP)   # each backward frees its graph
    saved = statistics.median([r["saved_mib"] / r["k"] for r in mem if r["mode"] == KEEP])
    keep_t = ki + ks * T
    def effect(what: str, sec: float, r: float) -> str:
        return f"{what} {sec:.3f} → {sec * r:.3f} s, step {step:.2f} → {step + sec * (r - 1):.2f} s"

    rows = [
        {"what": f"(a) image generation, s/image (G={a['batch']}, T={a['T']}, {a['tokens']} image tokens)",
         "ours": a["sampler"], "base": a["reference"], "ratio": ra, "effect": effect("image phase", image, ra)},
        {"what": f"(b) reward + DSOG screen calls of a group, s ({b['calls']} calls, {b['samples']} samples)",
         "ours": b["batched"], "base": b["single"], "ratio": rb, "effect": effect("reward + screen", rew, rb)},
        {"what": f"(c) learner peak memory at T={T}, MiB (keep: fit over k={','.join(map(str, KS))}; per-step: "
                 "largest measured)", "ours": flat, "base": keep_t, "ratio": keep_t / max(flat, 1e-9),
         "effect": f"+{ks:.2f} MiB per kept step ({saved:.2f} MiB saved for backward per step)"}]
    for dt, per in real.items():
        g = per / 2**30
        rows.append({"what": f"(c) real shapes, T=50, {dt}: saved for backward, GiB (meta estimate)", "ours": g,
                     "base": 50 * g, "ratio": 50.0, "effect": f"{g:.2f} GiB per kept step; 50 kept steps need "
                                                             f"{50 * g:.0f} GiB on top of weights + optimizer"})
    if not history:
        for r in rows[:2]:
            r["effect"] = "-"
    cols = [("what", "baseline", ""), ("ours", "service", ".4g"), ("base", "baseline", ".4g"),
            ("ratio", "baseline / service", ".2f"), ("effect", "effect on the step (projected)", "")]
    return "\n".join([
        "**Baselines** (driver process, after the Ray roles stopped)", "", table(rows, cols), "",
        f"(a) launch/bench/rollout.reference_generate vs the service's sampler: same weights, prompts and seeds; "
        f"identical grid tokens {100 * a['same']:.0f} %; the projection scales the whole image phase. (b) in-process "
        f"experts (actors.rollout.scoring.local_scorer): the group's {b['screen_calls']} DSOG screen call(s) and its reward "
        f"call, each split into one-sample calls; served, every extra call also pays a Ray RPC (--serve).", "",
        "**(c) Learner memory per kept MaskGIT step** (sample 0 of the group; peak Δ = CUDA max allocated or peak "
        "RSS above the level at entry, .grad buffers allocated beforehand)", "",
        table(mem, [("mode", "mode", ""), ("k", "k steps", "d"), ("peak_mib", "peak Δ MiB", ".2f"),
                    ("saved_mib", "saved for backward MiB", ".2f")]), "",
        f"- fit: keep k graphs {ks:.2f} MiB per kept step (intercept {ki:.2f}); per-step backward "
        f"{fit(mem, PER_STEP)[0]:.2f} MiB per step (flat up to allocator noise)",
        f"- the meta-device estimator gives {meta_here / MIB:.2f} MiB per step at these shapes (measured "
        f"{saved:.2f}); the real-shape rows use it with Show-o 512 shapes"])


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments (launch/bench/serve's --serve-* options included)."""
    from launch.bench.serve import add_arguments

    p = argparse.ArgumentParser(prog="python -m launch.bench.step", description=__doc__.split("\n")[0])
    p.add_argument("--real-shapes", action="store_true", help="Show-o 512 shapes, random weights, one CUDA GPU")
    p.add_argument("--steps", type=int, default=3, help="measured steps (medians)")
    p.add_argument("--warmup", type=int, default=1, help="steps before measuring (the first calibrates DSOG)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per baseline method after 1 warm-up, "
                                                             "interleaved (median; default 7, real shapes 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process baselines")
    p.add_argument("--skip-step", action="store_true", help="only the in-process baselines (no Ray)")
    p.add_argument("--scaling", action="store_true", help="only launch/bench/scaling: group sharding over rollout "
                   "actors and learner units per forward (figures as NAME: VALUE lines)")
    p.add_argument("--service-time", type=float, default=0.25, help="--scaling: seconds injected into every screen "
                   "and reward call for the reward-latency-hiding figure (a remote GPU expert's round trip)")
    p.add_argument("--serve", action="store_true", help="also run launch/bench/serve (~40 s more)")
    p.add_argument("--address", default=None, help="join this Ray cluster (no memory per role then)")
    p.add_argument("--out", default=None, help="also write the Markdown to this file")
    p.add_argument("--verbose", action="store_true", help="Ray worker logs and INFO logging")
    add_arguments(p)
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (on configs/tiny_cpu.yaml)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    """Run the benchmark; print, return and (``--out``) write the Markdown."""
    import logging

    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")   # read when ray is first imported
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    def log(msg):
        print(f"[bench_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.real_shapes and not torch.cuda.is_available():
        raise SystemExit("--real-shapes needs a CUDA GPU (the default run already includes the real-shape "
                         "learner-memory estimate)")
    device, repeats = ("cuda", args.repeats or 2) if args.real_shapes else ("cpu", args.repeats or 7)
    t0, tmp, history = time.perf_counter(), tempfile.mkdtemp(prefix="bench_step_"), None
    parts = [f"Machine: {machine()}", ""]
    if args.scaling:
        from launch.bench.scaling import GROUP_SIZE, run_scaling

        try:
            cfg = bench_config(False, [f"rollout.group_size={GROUP_SIZE}", *args.overrides], tmp)
            parts.append(run_scaling(cfg, args.repeats or 3, args.threads, log, service_s=args.service_time))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _emit(parts, args.out)
    try:
        cfg = bench_config(args.real_shapes, args.overrides, tmp)
        if not args.skip_step:
            import ray

            from actors.cluster.ray_env import start_local_ray

            started = not ray.is_initialized()
            start_local_ray(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, address=args.address)
            try:
                run = measure_steps(cfg, args.warmup, args.steps, log)
                history = run.history
                parts += [render_step(run, cfg, memory=not args.address), ""]
                if args.serve:
                    from launch.bench.serve import markdown, run_serve_bench

                    rows = run_serve_bench(args.serve_expert, args.serve_seconds, args.serve_inflight,
                                           args.serve_samples)
                    parts += [markdown(rows, args.serve_expert, args.serve_samples, args.serve_inflight), ""]
            finally:
                if started:
                    with contextlib.suppress(Exception):
                        from ray import serve

                        serve.shutdown()
                    ray.shutdown()
        torch.set_num_threads(args.threads)
        log("in-process baselines")
        ip = inprocess_group(cfg, device)
        a, b = bench_sampler(ip, repeats), bench_reward_calls(ip, repeats)
        mem = learner_memory(ip)
        g = cfg.sampler.guidance_scale
        real = {dt: real_shape_saved_per_step(dt, g, cfg.objective) for dt in ("bfloat16", "float32")}
        here = meta_saved_per_step(ip.policy.phi_config, ip.policy.tok, samples_t2i(ip.samples), cfg.model.dtype,
                                   g, cfg.objective)
        parts.append(render_baselines(history, a, b, mem, real, here, cfg.sampler.timesteps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts += ["", f"Benchmark wall time {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at "
                  f"the end; in-process torch threads {torch.get_num_threads()}."]
    return _emit(parts, args.out)


def _emit(parts: list[str], out: str | None) -> str:
    """Print the Markdown, write it to ``out`` when given, return it."""
    text = "\n".join(parts)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
