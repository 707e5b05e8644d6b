"""The prepared GPU check: real Show-o shapes with random weights in bf16 on one GPU, in a few minutes.

    python -m launch.bench.gpu                          # on a CUDA machine: Show-o 512 shapes, bf16, G = 9, T = 50
    python -m launch.bench.gpu --tiny --device cpu      # the same code on the tiny model (what the tests run)

1. **Sampler** (:class:`backbone.maskgit.MaskGITSampler`, the rollout actors' code): one group of G images, T MaskGIT
   steps, CFG 5: images/s, model TFLOP/s and MFU (FLOPs: :func:`launch.bench.rollout.sampler_flops`).
2. **Learner replay** (:func:`actors.learner.step.run_units` with :class:`actors.learner.step.ShowoBackend`, a learner
   rank's code): the group's G × T image units, recorded by the sampler above, replayed with the Dr.GRPO loss, the
   frozen reference's forward and one backward per pack, for ``learner.units_per_forward`` = 1, 2, 4: units/s,
   MFU (policy forward + backward = 3 forwards, reference 1) and peak GPU memory of the replay.
3. **Running batch** (``--batches 1,4,9,16``; :meth:`backbone.maskgit.MaskGITSampler.step_many`, the continuous
   engine's step): b samples each at its own MaskGIT step (staggered, as in a full running batch), one forward per
   step for all of them: images/s (b / (T × seconds per step)), MFU and peak memory per b: what
   ``rollout.max_batch`` is chosen from.
4. **Per-rank memory** of a learner rank under DeepSpeed ZeRO-2 at ``--ranks`` ranks, an upper bound: policy and
   reference weights, plus the measured peak of the replay above them (activations and the whole bf16 gradient, of
   which ZeRO-2 keeps only the rank's partition), plus the fp32 master weights and Adam moments of the rank's shard
   (12 bytes per parameter / ranks; computed, no optimizer is built).

Prints Markdown tables, then ``NAME: VALUE`` lines. Never part of the tests' GPU needs: the tests run ``--tiny``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

UNITS = (1, 2, 4)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def replay_flops(cfg, prefix: int, n: int, codebook: int) -> float:
    """Model FLOPs of one image replay unit's forward: cond + uncond rows over the whole sequence (prefix + image
    block), the code rows of lm_head at the N image positions."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    length = prefix + n + 2
    per_tok = 2 * layers * (4 * d * d + 2 * d * inter)
    return float(2 * (length * per_tok + layers * 4 * d * length * length / 2 + 2 * n * d * codebook))


def bench_sampler(model, tok, t2i, group: int, timesteps: int, repeats: int, device: str):
    """(seconds per group, recorded sampler state) of the service's sampler."""
    from backbone.config import SamplerConfig
    from backbone.maskgit import MaskGITSampler

    sampler = MaskGITSampler(model, tok, SamplerConfig(timesteps=timesteps, guidance_scale=5.0))
    times, state = [], None
    for r in range(repeats + 1):   # round 0 warms up (kernels, allocator)
        gens = [torch.Generator(device=device).manual_seed(1000 * r + i) for i in range(group)]
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            state = sampler.generate(t2i, gens)
        _sync(device)
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def bench_running_batch(model, tok, t2i, batch: int, timesteps: int, repeats: int, device: str):
    """(seconds per running-batch step, peak bytes) for ``batch`` samples at staggered MaskGIT steps."""
    from backbone.config import SamplerConfig
    from backbone.maskgit import MaskGITSampler
    from launch.bench.memory import peak_memory

    sampler = MaskGITSampler(model, tok, SamplerConfig(timesteps=timesteps, guidance_scale=5.0))
    rows = t2i.input_ids.shape[0]

    def fresh(i: int):
        """A new single-sample state of prompt ``i % rows``."""
        one = type(t2i)(**{k: (v[i % rows:i % rows + 1] if torch.is_tensor(v) else v) for k, v in vars(t2i).items()})
        return sampler.start(one, [torch.Generator(device=device).manual_seed(i)])

    times, peak = [], 0
    with torch.no_grad():
        states = [fresh(i) for i in range(batch)]
        for i, state in enumerate(states):   # sample i starts i steps behind sample 0 (modulo T): every step occurs
            sampler.run(state, stop_after_step=(batch - i) % timesteps)
        for r in range(repeats + 1):
            states = [fresh(i) if s.done else s for i, s in enumerate(states)]   # keep the batch full
            with peak_memory(device) as mem:
                _sync(device)
                t0 = time.perf_counter()
                sampler.step_many(states)
                _sync(device)
                elapsed = time.perf_counter() - t0
            if r:
                times.append(elapsed)
                peak = max(peak, mem["bytes"])
    return statistics.median(times), peak


def group_samples(t2i, state) -> list:
    """The recorded group as the learner sees it (the RolloutSample fields the image replay reads)."""
    traj = state.trajectory
    out = []
    for i in range(traj.states.shape[0]):
        out.append(SimpleNamespace(
            states=traj.states[i].cpu().numpy(), chosen=traj.chosen[i].cpu().numpy(),
            image_logps=traj.logps[i].float().cpu().numpy(), t2i_input_ids=t2i.input_ids[i].cpu().numpy(),
            uncond_input_ids=t2i.uncond_input_ids[i].cpu().numpy(), prompt_cut=False,
            advantage=float((-1) ** i) * 0.5, answer_ids=np.zeros(0, np.int64)))
    return out


def bench_replay(model, tok, samples, k_values, repeats: int, device: str) -> dict:
    """Per units_per_forward: (seconds for the group's image units, peak bytes above the weights)."""
    from actors.learner.step import ShowoBackend, run_units, schedule_units
    from launch.bench.memory import peak_memory
    from rl.grpo.config import ObjectiveConfig

    backend = ShowoBackend(SimpleNamespace(model=model, tok=tok, concepts={}), ObjectiveConfig(kl_beta=0.01), 5.0)
    model.train().requires_grad_(True)
    units = schedule_units(samples, 1, 0.0)[0]
    out = {}
    for k in k_values:
        times, peak = [], 0
        for r in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            backend.begin_step()
            with peak_memory(device) as mem:   # CUDA allocated (RSS on CPU) above the level at entry
                t0 = time.perf_counter()
                run_units(model, lambda loss: loss.backward(), backend, samples, units, 1, units_per_forward=k)
                _sync(device)
                elapsed = time.perf_counter() - t0
            if r:
                times.append(elapsed)
                peak = max(peak, mem["bytes"])
        out[k] = (statistics.median(times), peak, len(units))
    model.zero_grad(set_to_none=True)
    return out


def peak_tflops(device: str, dtype: str, override: float | None) -> float | None:
    """The accelerator's dense peak (launch.bench.rollout's table by name) or ``override``."""
    from launch.bench.rollout import peak_tflops as by_name

    if not device.startswith("cuda"):
        return override
    return by_name(torch.cuda.get_device_name(), dtype, override)


def main(argv=None) -> str:
    """Run the three measurements; print and return the Markdown + figure lines."""
    from launch.bench.rollout import build_setup, sampler_flops

    p = argparse.ArgumentParser(prog="python -m launch.bench.gpu", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n    python -m launch.bench.gpu\n"
                                       "    python -m launch.bench.gpu --tiny --device cpu --timesteps 4")
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of Show-o 512 shapes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--group", type=int, default=9, help="G (paper Table 4: 9)")
    p.add_argument("--timesteps", type=int, default=50, help="T (paper Table 4: 50)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (median)")
    p.add_argument("--ranks", type=int, default=4, help="learner ranks for the ZeRO-2 per-rank estimate")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: by name)")
    p.add_argument("--batches", default="1,4,9,16", help="running-batch sizes to measure (comma-separated; empty: "
                   "skip)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("launch.bench.gpu: no CUDA device (use --tiny --device cpu to run the code on CPU)")
    dtype = getattr(torch, args.dtype)
    model, tok, t2i = build_setup(not args.tiny, args.group, args.device, dtype)
    params = sum(p.numel() for p in model.parameters())
    prefix, n = t2i.text_len, t2i.num_image_tokens
    peak = peak_tflops(args.device, args.dtype, args.peak_tflops)

    def mfu(flops: float, sec: float) -> str:
        return f"{100 * flops / sec / 1e12 / peak:.1f}%" if peak else "n/a"

    sec, state = bench_sampler(model, tok, t2i, args.group, args.timesteps, args.repeats, args.device)
    s_flops = sampler_flops(model.config, args.group, prefix, n, args.timesteps, tok.codebook_size)
    samples = group_samples(t2i, state)
    del state
    replay = bench_replay(model, tok, samples, UNITS, args.repeats, args.device)
    unit_flops = replay_flops(model.config, prefix, n, tok.codebook_size) * 4   # fwd + bwd (2×) + reference fwd
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    shapes = "tiny model" if args.tiny else "Show-o 512 shapes (phi-1.5, 1024 image tokens), random weights"
    lines = [f"GPU check: {shapes}, {params / 1e9:.2f} B parameters, {args.dtype}, {name}, G = {args.group}, "
             f"T = {args.timesteps}, CFG 5; peak {peak or 'unknown'} TFLOP/s; medians of {args.repeats}.", "",
             "| part | seconds | rate | TFLOP/s | MFU | peak memory |", "|---|---:|---:|---:|---:|---:|",
             f"| sampler, one group | {sec:.2f} | {args.group / sec:.3f} images/s | {s_flops / sec / 1e12:.1f} | "
             f"{mfu(s_flops, sec)} | |"]
    for k, (rsec, rpeak, units) in replay.items():
        flops = unit_flops * units
        lines.append(f"| learner replay, units_per_forward {k} | {rsec:.2f} | {units / rsec:.2f} units/s | "
                     f"{flops / rsec / 1e12:.1f} | {mfu(flops, rsec)} | {rpeak / 2**30:.2f} GiB |")
    running = {}
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        step_s, step_peak = bench_running_batch(model, tok, t2i, b, args.timesteps, max(3, args.repeats), args.device)
        flops = sampler_flops(model.config, b, prefix, n, 1, tok.codebook_size) - sampler_flops(
            model.config, b, prefix, n, 0, tok.codebook_size)   # one step of b samples (no prefix)
        running[b] = step_s
        lines.append(f"| running batch {b} (one step) | {step_s:.4f} | {b / (args.timesteps * step_s):.3f} images/s "
                     f"| {flops / step_s / 1e12:.1f} | {mfu(flops, step_s)} | {step_peak / 2**30:.2f} GiB |")
    best = min(replay, key=lambda k: replay[k][0])
    weights = params * torch.finfo(dtype).bits // 8
    state_bytes = 12 * params / args.ranks          # fp32 master + Adam m, v of the rank's ZeRO-2 shard
    rank_peak = 2 * weights + replay[best][1] + state_bytes
    lines += ["", f"Learner rank under ZeRO-2 at {args.ranks} ranks, units_per_forward {best} (upper bound): policy + "
              f"reference weights {2 * weights / 2**30:.2f} GiB, replay peak above them {replay[best][1] / 2**30:.2f} "
              f"GiB (measured: activations + the whole gradient), fp32 master + Adam shard {state_bytes / 2**30:.2f} "
              f"GiB (computed): at most {rank_peak / 2**30:.1f} GiB per rank."]
    figures = [f"sampler images/s: {args.group / sec:.3f}", f"sampler MFU: {mfu(s_flops, sec)}",
               f"replay MFU: {mfu(unit_flops * replay[best][2], replay[best][0])}",
               f"replay peak GiB: {replay[best][1] / 2**30:.2f}", f"learner rank GiB: {rank_peak / 2**30:.1f}"]
    figures += [f"running batch {b} images/s: {b / (args.timesteps * sec_b):.3f}" for b, sec_b in running.items()]
    text = "\n".join(lines) + "\n\n" + "\n".join(figures)
    print(text)
    sys.stdout.flush()
    return text


if __name__ == "__main__":
    main()
