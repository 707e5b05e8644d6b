"""Starting and joining Ray safely: loopback-only by default (design D15 / issues 12, 16).

Which cluster a run uses is explicit. ``address`` None (and no ``RAY_ADDRESS``) always starts a new private cluster
on 127.0.0.1 (``ray.init(address="local")``), whatever cluster Ray has recorded on the machine
(``$RAY_TMPDIR/ray/ray_current_cluster``, written by ``ray start``); ``"auto"`` or an address joins that cluster and
then never passes resources or bind addresses meant for a local start (Ray rejects them, and they would be ignored
anyway). The log says which one happened.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

LOCAL_ONLY_KEYS = ("num_cpus", "num_gpus", "include_dashboard", "dashboard_host", "_metrics_export_port",
                   "_node_ip_address")
"""``ray.init`` arguments that only apply when starting a cluster; never passed when joining one."""


def loopback_env() -> dict[str, str]:
    """Environment variables that keep a locally started Ray (and its workers) on 127.0.0.1."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _job_env_vars() -> dict:
    """env_vars of the submitted job's runtime env (empty outside ``ray job submit``)."""
    import json

    try:
        cfg = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return dict((cfg.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def resolve_address(address: str | None) -> str | None:
    """The cluster to join, or None for a new private local cluster: ``address`` if given (``"local"`` means
    None), else ``RAY_ADDRESS`` if set and non-empty. Ray's recorded "current cluster" is never consulted."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def ray_init_kwargs(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
                    include_dashboard: bool = False, dashboard_host: str = LOOPBACK,
                    metrics_export_port: int | None = None, runtime_env: dict | None = None) -> dict:
    """``ray.init`` keyword arguments: joining ``address`` (resolved, see :func:`resolve_address`) or starting a
    private local cluster (``address="local"``, node IP, dashboard and metrics on loopback)."""
    env_vars = dict(loopback_env())
    env_vars.update((runtime_env or {}).get("env_vars", {}))
    # under `ray job submit --runtime-env ...` Ray refuses a driver env var the job's runtime env already sets
    job_vars = _job_env_vars()
    env_vars = {k: v for k, v in env_vars.items() if k not in job_vars}
    runtime_env = dict(runtime_env or {}, env_vars=env_vars)
    if address:
        ignored = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus),
                                      ("metrics_export_port", metrics_export_port)) if v is not None}
        if include_dashboard:
            ignored["include_dashboard"] = True
        if ignored:
            log.warning("joining the existing cluster %s: ignoring local-start settings %s (the cluster's own "
                        "resources and ports apply)", address, ignored)
        return dict(address=address, runtime_env=runtime_env, log_to_driver=True)
    kwargs = dict(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                  runtime_env=runtime_env, _node_ip_address=LOOPBACK)
    if include_dashboard:
        kwargs["dashboard_host"] = dashboard_host
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    return kwargs


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None, include_dashboard: bool = False,
                    dashboard_host: str = LOOPBACK, metrics_export_port: int | None = None,
                    address: str | None = None, runtime_env: dict | None = None):
    """Join the Ray cluster at ``address`` / ``RAY_ADDRESS`` (e.g. under ``ray job submit``) or start a new
    private one bound to loopback (see the module docstring). Returns ``ray.init``'s context (or the current
    runtime context when this process is already connected)."""
    address = resolve_address(address)
    if not address:  # must be set before Ray resolves the node IP (i.e. before ray.init)
        for key, value in loopback_env().items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs = ray_init_kwargs(address, num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                             dashboard_host=dashboard_host, metrics_export_port=metrics_export_port,
                             runtime_env=runtime_env)
    if address:
        log.info("joining the existing Ray cluster at %s", address)
        info = ray.init(**kwargs)
        log.info("joined Ray cluster %s", info.address_info.get("gcs_address", address))
        return info
    log.info("starting a new private Ray cluster on %s (dashboard: %s); a cluster recorded on this machine is "
             "not joined (set ray.address=auto or RAY_ADDRESS to join one)", LOOPBACK, include_dashboard)
    info = ray.init(**kwargs)
    log.info("started private Ray cluster %s", info.address_info.get("gcs_address"))
    return info


def start_ray_from_config(rc):
    """:func:`start_local_ray` with the fields of a ``configs.schema.RayConfig``."""
    return start_local_ray(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=rc.include_dashboard,
                           dashboard_host=rc.dashboard_host, metrics_export_port=rc.metrics_export_port,
                           address=rc.address)


def listening_sockets(root_pid: int | None = None) -> list[dict]:
    """TCP sockets in LISTEN state opened by ``root_pid`` (default: this process) and all its descendants — a
    locally started Ray cluster's GCS, raylet, agents and every worker, Serve's proxy and replicas included.
    Each: ``{"pid", "name", "address", "port"}``, sorted by process name and port."""
    import psutil

    root = psutil.Process(root_pid or os.getpid())
    procs = {root.pid: root}
    procs.update({p.pid: p for p in root.children(recursive=True)})
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in procs:
            continue
        try:
            name = " ".join(procs[conn.pid].cmdline()[:2])[-60:] or procs[conn.pid].name()
        except psutil.Error:
            name = "?"
        out.append({"pid": conn.pid, "name": name, "address": conn.laddr.ip, "port": conn.laddr.port})
    return sorted(out, key=lambda s: (s["name"], s["port"]))


def is_loopback_address(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped ::ffff:127.x (a wildcard 0.0.0.0 / :: is not loopback)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback
