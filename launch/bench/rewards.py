"""Reward-expert throughput: samples/s per expert and batch size, printed as a Markdown table.

    python -m launch.bench.rewards                    # tiny random-init configs (TIER: the real MiniLM)
    python -m launch.bench.rewards --real-shapes      # random weights at real architecture sizes
    python -m launch.bench.rewards --experts der clip --batch-sizes 1 8 --device cuda

Times ``expert.score(batch)`` end to end (preprocessing, model, cosine), after one warm-up call per batch
size; references are added once beforehand (not timed). The helpers (:func:`time_call`, :class:`BenchRow`,
:func:`markdown_table`, :func:`bench_expert`, :func:`make_batch`) are meant to be reused, e.g. to time the
same batches through Ray Serve deployments.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from rewards.base import RewardExpert, ScoreBatch
from rewards.registry import build_expert, config_class

__all__ = ["BenchRow", "time_call", "markdown_table", "make_batch", "bench_expert", "expert_config", "main"]

PROMPT = "A photo of a dog. The dog is sitting on a red sofa in a sunlit living room, looking at the camera."
FACTS = ["The dog loves swimming in the lake.", "The dog was adopted from a shelter in 2019.",
         "The dog's favourite toy is a squeaky duck.", "The dog is afraid of thunderstorms."]


@dataclass
class BenchRow:
    """One measurement: an expert (variant) at one batch size."""

    expert: str
    variant: str
    batch_size: int | None
    seconds: float
    """Median wall time of one ``score`` call."""
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        """Throughput."""
        return self.batch_size / self.seconds if self.batch_size and self.seconds > 0 else float("nan")

    @property
    def ms_per_batch(self) -> float:
        """Latency of one call in milliseconds."""
        return 1e3 * self.seconds


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, min_seconds: float = 0.0,
              sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (at least until ``min_seconds`` total) after warm-up."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown_table(rows: Sequence[object], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (attribute or property, header, format spec), rows are objects or
    dicts; None/NaN cells print as "-"."""
    def cell(row, key, fmt):
        value = row[key] if isinstance(row, dict) else getattr(row, key)
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        return format(value, fmt)

    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    align = "|" + "|".join("---:" if fmt and fmt[-1] in "fdeg" else "---" for _, _, fmt in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, fmt) for k, _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, align, *body])


BENCH_COLUMNS = [("expert", "expert", ""), ("variant", "variant", ""), ("batch_size", "batch", "d"),
                 ("ms_per_batch", "ms / call", ".1f"), ("samples_per_s", "samples/s", ".2f"), ("note", "note", "")]
"""Columns of the throughput table."""


def make_batch(expert: str, batch_size: int, image_size: int, seed: int = 0) -> ScoreBatch:
    """A synthetic batch with the fields ``expert`` reads (FER gets the astronaut's face so that the embedding
    path runs; the others random pixels)."""
    rng = np.random.default_rng(seed)
    if expert == "tier":
        half = batch_size // 2
        return ScoreBatch(texts=[f"The dog likes swimming ({i})." for i in range(batch_size)],
                          candidates=[FACTS] * half + [["The dog is swimming in a lake."]] * (batch_size - half),
                          targets=[0] * half + [-1] * (batch_size - half))
    if expert == "fer":
        import skimage.data

        face = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None]
        face = torch.nn.functional.interpolate(face, size=(image_size, image_size), mode="bilinear", antialias=True)
        images = np.repeat(face.clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()[None], batch_size, axis=0)
    else:
        images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    return ScoreBatch(images=images, texts=[PROMPT] * batch_size, concepts=["concept"] * batch_size)


def expert_config(name: str, real_shapes: bool, device: str):
    """(config, variant label) or (None, reason) for ``name``: tiny, or random weights at real sizes."""
    cfg = config_class(name).tiny()
    label = {"tier": "MiniLM-L6 (real weights)", "ber": "tiny random", "der": "tiny random",
             "fer": "MTCNN + random InceptionResnetV1", "clip": "tiny random"}[name]
    if real_shapes:
        if name == "ber":
            return None, "skipped: BLIP-2 ViT-g + Q-Former (1.2 B params) is too big for a CPU benchmark"
        if name == "der":
            cfg, label = dataclasses.replace(cfg, arch="base", image_size=224, resize=256), "DINOv2-base random"
        if name == "clip":
            cfg, label = dataclasses.replace(cfg, model_name="ViT-B-32"), "ViT-B-32 random"
    return dataclasses.replace(cfg, device=device, batch_size=max(32, cfg.batch_size)), label


def bench_expert(expert: RewardExpert, variant: str, batch_sizes: Iterable[int], image_size: int,
                 repeats: int = 3, min_seconds: float = 0.0) -> list[BenchRow]:
    """Time ``expert.score`` at each batch size (references added first, untimed)."""
    if expert.uses_references:
        refs = make_batch(expert.name, 3, image_size, seed=99).images
        expert.add_reference("concept", list(refs))
    sync = torch.cuda.synchronize if expert.device.type == "cuda" else None
    rows = []
    for bs in batch_sizes:
        batch = make_batch(expert.name, bs, image_size)
        seconds = time_call(lambda: expert.score(batch), repeats=repeats, min_seconds=min_seconds, sync=sync)
        rows.append(BenchRow(expert.name, variant, bs, seconds))
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark and print (and return) the Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", nargs="+", default=["tier", "ber", "der", "fer", "clip"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 32])
    p.add_argument("--real-shapes", action="store_true", help="random weights at real architecture sizes")
    p.add_argument("--image-size", type=int, default=None, help="generated image side (default 64 tiny, 512 real)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.0, help="keep timing until this much time was spent")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    from launch.bench.serve import add_arguments as add_serve_arguments
    from launch.bench.serve import main_from_args as serve_main
    p.add_argument("--serve", action="store_true", help="benchmark the Ray Serve deployments (launch/bench/serve.py)")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    if args.serve:
        return serve_main(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    default_size = 512 if args.real_shapes else 64
    rows: list[BenchRow] = []
    for name in args.experts:
        cfg, label = expert_config(name, args.real_shapes, args.device)
        if cfg is None:
            rows.append(BenchRow(name, "-", None, float("nan"), note=label))
            print(f"{name}: {label}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        expert = build_expert(name, cfg)
        load_s = time.perf_counter() - t0
        # FER needs a face MTCNN can find: at least 256 px even in the tiny table
        size = args.image_size or (max(default_size, 256) if name == "fer" else default_size)
        new = bench_expert(expert, label, args.batch_sizes, size, args.repeats, args.min_seconds)
        new[0].note = (f"{size}px images; " if "images" in expert.requires else "") + f"build {load_s:.1f} s"
        if name == "fer":
            new[-1].note = f"no-face count {expert.no_face_count}"
        rows.extend(new)
        print(f"{name}: done ({', '.join(f'{r.samples_per_s:.1f}' for r in new)} samples/s)", file=sys.stderr)
        del expert
    header = (f"Reward experts, {'real architecture sizes, random weights' if args.real_shapes else 'tiny configs'}; "
              f"device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs ({platform.machine()}), load average at the end "
              f"{os.getloadavg()[0]:.1f}; median of {args.repeats} calls after 1 warm-up")
    table = header + "\n\n" + markdown_table(rows, BENCH_COLUMNS)
    print(table)
    return table


if __name__ == "__main__":
    main()
