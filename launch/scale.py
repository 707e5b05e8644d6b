"""Change one reward expert's replica count while training runs, without touching the others.

examples:
    python -m launch.scale der 3                          # join the local cluster (RAY_ADDRESS or auto)
    python -m launch.scale der 1 --address 127.0.0.1:6379 --app-name rewards
    python -m launch.scale --status                       # replicas of every expert

Scaling is in place (Serve's external-scaler API, see ``actors.serving.deploy``): running replicas keep their ids,
scale-down drains the removed ones, the training run and the other experts are not affected. Autoscaled experts
are refused with a message (Serve's autoscaler owns their count).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

EXPERTS = ("tier", "ber", "der", "fer", "clip", "unipercept")
"""The reward experts (``actors.serving.deploy.ALL_EXPERTS``; repeated here so ``--help`` needs no Ray import)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expert", nargs="?", choices=EXPERTS, help="expert to scale")
    p.add_argument("replicas", nargs="?", type=int, help="new replica count (>= 0)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else 'auto')")
    p.add_argument("--app-name", default="rewards", help="serve.app_name of the run (default: rewards)")
    p.add_argument("--no-wait", action="store_true", help="return once the new target is set")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the replicas")
    p.add_argument("--status", action="store_true", help="print the replicas of every deployed expert")
    args = p.parse_args(argv)
    if not args.status and (args.expert is None or args.replicas is None):
        p.error("give EXPERT N, or --status")
    return args


def status(app_name: str) -> dict[str, list[dict]]:
    """``{expert: replicas}`` of every deployed expert of ``app_name``."""
    from actors.serving.deploy import replicas

    out = {}
    for expert in EXPERTS:
        try:
            out[expert] = replicas(app_name, expert)
        except ValueError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)   # before the heavy imports: --help and usage errors answer at once
    import os

    import ray

    from actors.cluster.ray_env import start_local_ray
    from actors.serving.deploy import scale_expert

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not ray.is_initialized():
        start_local_ray(address=args.address or os.environ.get("RAY_ADDRESS") or "auto")
    if args.status:
        print(json.dumps({e: [r["replica_id"] + ":" + r["state"] for r in reps]
                          for e, reps in status(args.app_name).items()}, indent=2))
        return 0
    try:
        reps = scale_expert(args.expert, args.replicas, args.app_name, wait=not args.no_wait, timeout_s=args.timeout)
    except (ValueError, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.expert}: {len(reps)} replica(s): {', '.join(r['replica_id'] for r in reps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
