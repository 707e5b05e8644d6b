"""Starting and joining Ray safely: loopback-only by default (design D15 / issue 12)."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


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


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None, include_dashboard: bool = False,
                    dashboard_host: str = LOOPBACK, metrics_export_port: int | None = None,
                    address: str | None = None, runtime_env: dict | None = None):
    """Join the Ray cluster at ``address`` (e.g. under ``ray job submit``) or start a local one bound to loopback.

    A local cluster binds the node IP, the dashboard and every port to 127.0.0.1 unless the caller passes another
    ``dashboard_host`` explicitly. Returns ``ray.init``'s context.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:  # must be set before Ray resolves the node IP (i.e. before ray.init)
        for key, value in loopback_env().items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    env_vars = dict(loopback_env())
    env_vars.update((runtime_env or {}).get("env_vars", {}))
    # under `ray job submit --runtime-env ...` Ray refuses a driver env var the job's runtime env already sets
    job_vars = _job_env_vars()
    env_vars = {k: v for k, v in env_vars.items() if k not in job_vars}
    runtime_env = dict(runtime_env or {}, env_vars=env_vars)
    if address:
        log.info("joining Ray cluster at %s", address)
        return ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    kwargs = dict(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                  runtime_env=runtime_env, _node_ip_address=LOOPBACK)
    if include_dashboard:
        kwargs["dashboard_host"] = dashboard_host
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    log.info("starting a local Ray cluster on %s (dashboard: %s)", LOOPBACK, include_dashboard)
    return ray.init(**kwargs)


def start_ray_from_config(rc):
    """:func:`start_local_ray` with the fields of a ``configs.schema.RayConfig``."""
    return start_local_ray(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=rc.include_dashboard,
                           dashboard_host=rc.dashboard_host, metrics_export_port=rc.metrics_export_port,
                           address=rc.address)
