"""Benchmark: the batched UniPercept expert vs the package's own per-image ``reward()``, same checkpoint, same run.

    python -m launch.bench.unipercept                      # tiny checkpoint, CPU, 16 images
    python -m launch.bench.unipercept --arch small         # 256 image tokens per image, like the real model
    python -m launch.bench.unipercept --images 32 --batch-sizes 1,8,16 --device cuda
    python -m launch.bench.unipercept --model-path /models/UniPercept --dtype bfloat16 --device cuda

Runs in the UniPercept environment (re-executes itself there when started from the project interpreter; build it
with ``python -m launch.build_reward_env unipercept``). Both sides get the same uint8 images: the package as PNG
files (its only input; writing them is not timed), the expert as arrays. Both run in ``--dtype`` (fp32 default, so
the scores can be compared); the largest absolute difference of the 0-100 scores is reported. The two sides are
timed in interleaved rounds and the best round of each counts (load from other processes hits both). Prints a
Markdown table with the ratio to the package, then ``NAME: VALUE`` lines.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "run"]


def _in_env() -> bool:
    try:
        import transformers
        import unipercept_reward  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means: not the UniPercept environment
        return False
    from rewards.unipercept import REQUIRED_TRANSFORMERS

    return transformers.__version__ == REQUIRED_TRANSFORMERS


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Smooth random images (a few low-frequency waves plus noise), varied content per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, (3, 2))
        base = np.stack([np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + rng.uniform(0, 6)) for c in range(3)], -1)
        img = 127.5 + 100 * base + rng.normal(0, rng.uniform(0, 40), base.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def run(args) -> dict:
    """Time both scorers and compare their scores; returns the numbers (temporary files are removed)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-unipercept-"))
    try:
        return _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, tmp: Path) -> dict:
    import torch
    from PIL import Image
    from unipercept_reward import UniPerceptRewardInferencer

    from rewards.unipercept import DIMENSIONS, UniPerceptConfig, UniPerceptExpert
    from rewards.unipercept_tiny import build_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.model_path or str(build_tiny_checkpoint(tmp / "tiny", seed=0, arch=args.arch))
    images = _images(args.images, args.size, seed=1)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    dtype = getattr(torch, args.dtype)
    experts = {bs: UniPerceptExpert(UniPerceptConfig(model_path=ckpt, device=args.device, dtype=args.dtype,
                                                     batch_size=bs)) for bs in args.batch_sizes}
    package = UniPerceptRewardInferencer(model_path=ckpt, device=args.device, dtype=dtype)

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(len(images))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    scorers = {"package": lambda n: package.reward(paths[:n])}
    for bs, e in experts.items():
        scorers[bs] = lambda n, e=e: e.dimension_scores(images[:n])
    times: dict = {k: [] for k in scorers}
    outs: dict = {}
    for fn in scorers.values():
        fn(2)                                                    # warm-up on two images
    for _ in range(args.rounds):    # interleaved rounds, best of each: load from other processes hits all sides
        for k, fn in scorers.items():
            outs[k], t = timed(fn)
            times[k].append(t)
    ref = outs.pop("package")
    if any(r is None for r in ref):
        raise RuntimeError("the package's reward() returned None for some image (it swallows its errors)")
    diff = max(abs(r[k] - float(mine[k][i])) for mine in outs.values() for i, r in enumerate(ref) for k in DIMENSIONS)
    return {"images": len(images), "times": {k: min(v) for k, v in times.items()}, "max_abs_diff": diff,
            "checkpoint": f"{args.arch} random-init" if not args.model_path else args.model_path}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m launch.bench.unipercept", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16, help="images scored by each side")
    ap.add_argument("--size", type=int, default=256, help="side of the generated test images (resized to 448)")
    ap.add_argument("--batch-sizes", default="1,8", help="expert micro-batch sizes to time (comma-separated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--model-path", default=None, help="a local UniPercept checkpoint (default: a random-init one)")
    ap.add_argument("--arch", default="tiny", choices=["tiny", "small"],
                    help="random-init size: tiny (16 image tokens) or small (256 image tokens, like the real model)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best of each side counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--python", default=None, help="UniPercept interpreter (default: serve.unipercept.python)")
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if args.images < 2 or min(args.batch_sizes) < 1 or args.rounds < 1:
        ap.error("--images must be >= 2, --batch-sizes and --rounds >= 1")
    if not _in_env():
        from configs.serve import UNIPERCEPT_PYTHON
        from rewards.expert_env import PROJECT_ROOT, check_python, resolve_python

        python = resolve_python(args.python or UNIPERCEPT_PYTHON)
        check_python(python, "unipercept")
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.call([str(python), "-m", "launch.bench.unipercept", *argv], env=env)
    r = run(args)
    n, times = r["images"], r["times"]
    base = n / times["package"]
    print(f"UniPercept scoring, {n} images of {args.size} px, {r['checkpoint']}, {args.device}, {args.dtype}, "
          f"3 dimensions each, best of {args.rounds} interleaved rounds\n")
    print("| scorer | seconds | samples/s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| package `reward()` (per image, files) | {times['package']:.2f} | {base:.2f} | 1.00x |")
    best = max(bs for bs in args.batch_sizes if n / times[bs] == max(n / times[b] for b in args.batch_sizes))
    for bs in args.batch_sizes:
        print(f"| expert, batch {bs} (arrays) | {times[bs]:.2f} | {n / times[bs]:.2f} | {n / times[bs] / base:.2f}x |")
    print()
    print(f"UNIPERCEPT_PACKAGE_SAMPLES_PER_S: {base:.3f}")
    for bs in args.batch_sizes:
        print(f"UNIPERCEPT_BATCH{bs}_SAMPLES_PER_S: {n / times[bs]:.3f}")
    print(f"UNIPERCEPT_BEST_BATCH: {best}")
    print(f"UNIPERCEPT_SPEEDUP: {n / times[best] / base:.3f}")
    print(f"UNIPERCEPT_MAX_ABS_DIFF: {r['max_abs_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
