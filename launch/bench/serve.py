"""Served reward throughput: ``@serve.batch`` vs one request at a time, and 1 vs 3 replicas, in one run.

    python -m launch.bench.serve [--expert der] [--seconds 8] [--inflight 32] [--samples 4] [--num-cpus 4]

Starts a local loopback Ray cluster (or joins ``--address``), deploys one tiny expert under its own application
prefix, drives it through a deployment handle with a fixed number of requests in flight, and prints a Markdown
table of samples/s with the ratios. The expert and payload are tiny, so the numbers measure the serving path
(RPC, batching, replica fan-out) more than the model; on a shared 2-core machine expect noise.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from actors.cluster.ray_env import loopback_env

for _key, _value in loopback_env().items():  # before Ray is imported anywhere
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402


@dataclass
class Row:
    """One measured configuration."""

    name: str
    replicas: int
    max_batch_size: int
    requests: int
    samples_per_s: float
    p50_ms: float


def free_port() -> int:
    """A free loopback port for Serve's proxy (other sessions may hold the default ones)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(handle, batch, seconds: float, inflight: int) -> tuple[int, float, list[float]]:
    """Keep ``inflight`` requests outstanding for ``seconds``; returns (requests, elapsed, latencies)."""
    pending: list[tuple[float, object]] = []
    done, lat = 0, []
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        while now - t0 < seconds and len(pending) < inflight:
            pending.append((time.monotonic(), handle.options(method_name="score").remote(batch)))
        if not pending:
            break
        started, resp = pending.pop(0)
        resp.result(timeout_s=120)
        lat.append(time.monotonic() - started)
        done += 1
    return done, time.monotonic() - t0, lat


def measure(cfg, expert: str, name: str, replicas: int, batch, seconds: float, inflight: int) -> Row:
    """Warm up, then drive the deployment and summarise."""
    from ray import serve

    from actors.serving.deploy import app_name, deployment_name

    handle = serve.get_deployment_handle(deployment_name(expert), app_name(cfg, expert))
    drive(handle, batch, min(2.0, seconds / 4), inflight)  # warm-up: routers, threads, caches
    n, elapsed, lat = drive(handle, batch, seconds, inflight)
    return Row(name, replicas, cfg.expert(expert).max_batch_size, n, n * len(batch) / elapsed,
               float(np.median(lat) * 1000))


def run_serve_bench(expert: str = "der", seconds: float = 8.0, inflight: int = 32, samples: int = 4,
                    image_size: int = 64, max_batch_size: int = 16, overrides: dict | None = None) -> list[Row]:
    """Measure batched/1 replica, batched/3 replicas and unbatched/1 replica (Ray must be initialised).

    ``overrides`` are set on the expert's tiny config (e.g. ``{"arch": "small", "image_size": 112}`` for DER to
    make the model, not the RPC path, dominate)."""
    from actors.serving.deploy import deploy_rewards, scale_expert, shutdown_rewards
    from configs.serve import ServeConfig
    from rewards.base import ScoreBatch

    rng = np.random.default_rng(0)
    references = {"bench": [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(2)]}
    batch = ScoreBatch(images=rng.integers(0, 256, (samples, image_size, image_size, 3), dtype=np.uint8),
                       texts=["a photo of a bench object"] * samples, concepts=["bench"] * samples,
                       candidates=[["a", "b"]] * samples, targets=[0] * samples)
    rows = []
    for label, mbs in (("batched", max_batch_size), ("one at a time", 1)):
        cfg = ServeConfig.tiny()
        cfg.app_name = f"bench-{'b' if mbs > 1 else 's'}"
        cfg.enabled = [expert]
        cfg.http_port = free_port()
        ecfg = cfg.expert(expert)
        ecfg.max_batch_size, ecfg.batch_wait_timeout_s = mbs, 0.005 if mbs > 1 else 0.0
        ecfg.max_ongoing_requests = max(inflight, mbs)
        ecfg.overrides = dict(overrides or {})
        deploy_rewards(cfg, references=references)
        try:
            rows.append(measure(cfg, expert, f"{label}, 1 replica", 1, batch, seconds, inflight))
            if mbs > 1:
                scale_expert(expert, 3, cfg)
                rows.append(measure(cfg, expert, f"{label}, 3 replicas", 3, batch, seconds, inflight))
        finally:
            shutdown_rewards(cfg)
    return rows


def markdown(rows: list[Row], expert: str, samples: int, inflight: int) -> str:
    """The results as a Markdown table with ratios to the batched single-replica row."""
    base = rows[0].samples_per_s
    out = [f"Served `{expert}` (tiny), {samples} samples/request, {inflight} requests in flight, "
           f"{os.cpu_count()} CPU cores visible", "",
           "| configuration | replicas | max_batch_size | requests | samples/s | p50 latency ms | vs batched×1 |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.name} | {r.replicas} | {r.max_batch_size} | {r.requests} | {r.samples_per_s:.1f} | "
                   f"{r.p50_ms:.1f} | {r.samples_per_s / base:.2f}× |")
    by = {r.name: r.samples_per_s for r in rows}
    single, three = by.get("one at a time, 1 replica"), by.get("batched, 3 replicas")
    out.append("")
    if single:
        out.append(f"- `@serve.batch` vs one request at a time (1 replica): **{base / single:.2f}×**")
    if three:
        out.append(f"- 3 replicas vs 1 (batched): **{three / base:.2f}×**")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with launch.bench.rewards --serve."""
    p.add_argument("--serve-expert", default="der", help="expert to serve (tiny preset)")
    p.add_argument("--serve-seconds", type=float, default=8.0, help="measured seconds per configuration")
    p.add_argument("--serve-inflight", type=int, default=32, help="requests kept in flight")
    p.add_argument("--serve-samples", type=int, default=4, help="samples per request")
    p.add_argument("--serve-override", action="append", default=[], metavar="KEY=VALUE",
                   help="expert config field (YAML value), e.g. arch=small; repeatable")


def main_from_args(args: argparse.Namespace, address: str | None = None, num_cpus: int = 4) -> str:
    """Run the benchmark (starting and stopping a local cluster unless one is running) and print the table."""
    import ray
    from ray import serve

    from actors.cluster.ray_env import start_local_ray

    started = not ray.is_initialized()
    start_local_ray(num_cpus=num_cpus, address=address)
    try:
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.serve_override)}
        rows = run_serve_bench(args.serve_expert, args.serve_seconds, args.serve_inflight, args.serve_samples,
                               overrides=overrides)
        table = markdown(rows, args.serve_expert, args.serve_samples, args.serve_inflight)
        if overrides:
            table = table.replace("(tiny)", f"(tiny + {overrides})", 1)
        print(table)
        return table
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m launch.bench.serve", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local cluster")
    args = p.parse_args(argv)
    main_from_args(args, args.address, args.num_cpus)


if __name__ == "__main__":
    main()
