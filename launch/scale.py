"""Change one reward expert's replica count while training runs, without touching the others.

examples:
    python -m launch.scale der 3                          # the one Ray cluster on this machine (or RAY_ADDRESS)
    python -m launch.scale der 1 --address 127.0.0.1:6379 --app-name rewards
    python -m launch.scale --status                       # replicas of every expert
    python -m launch.scale --list                         # the Ray clusters running on this machine

Which cluster: ``--address`` if given, else ``RAY_ADDRESS``, else the only Ray cluster running on this machine.
With several on the machine (a shared host) and no address, it refuses and lists them (GCS address, session
folder, start time) instead of picking one; ``--address auto`` is treated the same way (Ray's own "auto" would take
the newest cluster recorded by ``ray start``, whoever started it). The first line printed names the cluster and
the applications (``<app-name>-<expert>``) it acts on.

Scaling is in place (Serve's external-scaler API, see ``actors.serving.deploy``): running replicas keep their ids,
scale-down drains the removed ones, the training run and the other experts are not affected. Autoscaled experts
are refused with a message (Serve's autoscaler owns their count).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXPERTS = ("tier", "ber", "der", "fer", "clip", "unipercept")
"""The reward experts (``actors.serving.deploy.ALL_EXPERTS``; repeated here so ``--help`` needs no Ray import)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expert", nargs="?", choices=EXPERTS, help="expert to scale")
    p.add_argument("replicas", nargs="?", type=int, help="new replica count (>= 0)")
    p.add_argument("--address", default=None, help="Ray cluster address (GCS host:port; default: RAY_ADDRESS, "
                   "else the only Ray cluster running on this machine)")
    p.add_argument("--app-name", default="rewards", help="serve.app_name of the run (default: rewards)")
    p.add_argument("--no-wait", action="store_true", help="return once the new target is set")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the replicas")
    p.add_argument("--status", action="store_true", help="print the replicas of every deployed expert")
    p.add_argument("--list", action="store_true", help="list the Ray clusters running on this machine and exit")
    args = p.parse_args(argv)
    if not (args.status or args.list) and (args.expert is None or args.replicas is None):
        p.error("give EXPERT N, or --status, or --list")
    return args


def ray_clusters() -> list[dict]:
    """The Ray clusters running on this machine that this user can see, one per GCS server process:
    ``{"address": "host:port", "session_dir", "pid", "started"}`` (oldest first)."""
    import datetime

    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        try:
            cmd = proc.info["cmdline"] or []
            if not cmd or Path(cmd[0]).name != "gcs_server":
                continue
            opts = dict(a[2:].split("=", 1) for a in cmd[1:] if a.startswith("--") and "=" in a)
            ports = sorted(c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
        except (psutil.Error, ValueError):
            continue
        if not ports:
            continue
        host = opts.get("node-ip-address") or opts.get("node_ip_address") or "127.0.0.1"
        port = int(opts.get("gcs_server_port") or 0) or ports[0]
        started = datetime.datetime.fromtimestamp(proc.info["create_time"]).strftime("%Y-%m-%d %H:%M:%S")
        out.append({"address": f"{host}:{port}", "session_dir": opts.get("session-dir", "?"), "pid": proc.info["pid"],
                    "started": started})
    return sorted(out, key=lambda c: c["started"])


def pick_cluster(address: str | None, env_address: str | None, clusters: list[dict]) -> str:
    """The cluster to act on: ``address``, else ``env_address`` (``RAY_ADDRESS``), else the only cluster of
    ``clusters``; "auto" counts as no address. Raises ValueError naming every cluster when that is ambiguous."""
    for given in (address, env_address):
        if given and given != "auto":
            return given
    if len(clusters) == 1:
        return clusters[0]["address"]
    if not clusters:
        raise ValueError("no Ray cluster is running on this machine (give --address HOST:PORT for a remote one)")
    listing = "; ".join(f"{c['address']} (session {Path(c['session_dir']).name}, started {c['started']})"
                        for c in clusters)
    raise ValueError(f"{len(clusters)} Ray clusters run on this machine, pick one with --address: {listing}")


def status(app_name: str) -> dict[str, list[dict]]:
    """``{expert: replicas}`` of every deployed expert of ``app_name`` (empty when Serve is not running)."""
    from ray.serve.exceptions import RayServeException

    from actors.serving.deploy import replicas

    out = {}
    for expert in EXPERTS:
        try:
            out[expert] = replicas(app_name, expert)
        except ValueError:
            continue
        except RayServeException as exc:   # no Serve instance on the cluster: nothing is deployed
            print(f"note: {exc}", file=sys.stderr)
            return {}
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)   # before the heavy imports: --help and usage errors answer at once
    import os

    import ray

    from actors.cluster.ray_env import start_local_ray
    from actors.serving.deploy import scale_expert

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        print(json.dumps(ray_clusters(), indent=2))
        return 0
    if not ray.is_initialized():
        try:
            address = pick_cluster(args.address, os.environ.get("RAY_ADDRESS"), ray_clusters())
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        start_local_ray(address=address)
    gcs = ray.get_runtime_context().gcs_address
    print(f"cluster {gcs}, applications {args.app_name}-<expert>", flush=True)
    if args.status:
        print(json.dumps({e: [r["replica_id"] + ":" + r["state"] for r in reps]
                          for e, reps in status(args.app_name).items()}, indent=2))
        return 0
    from ray.serve.exceptions import RayServeException

    try:
        reps = scale_expert(args.expert, args.replicas, args.app_name, wait=not args.no_wait, timeout_s=args.timeout)
    except (ValueError, TimeoutError, RuntimeError, RayServeException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.expert}: {len(reps)} replica(s): {', '.join(r['replica_id'] for r in reps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
