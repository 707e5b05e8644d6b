"""Reward experts on Ray Serve (design D13): config, deployment, live per-expert scaling, status, shutdown.

Layout: every expert is its own Serve *application* ``<app_name>-<expert>`` holding one deployment
``reward-<expert>`` (the replica class is :class:`actors.serving.replica.RewardReplica`). One application per
expert is what makes experts independent: each has its own replicas, resources, batching and autoscaling, its own
optional HTTP route ``<route_prefix>/<expert>`` (only an application's ingress gets a route), and redeploying or
scaling one never touches the others.

Live scaling (Ray 2.60): re-running ``serve.run`` on an application built in Python gives every deployment a
new random code version, i.e. a rolling restart of all its replicas. Fixed-size experts are therefore deployed
with ``external_scaler_enabled=True`` and scaled through Serve's external-scaler API
(``ServeController.update_deployment_replicas``, the same call as the dashboard's
``POST /api/v1/applications/<app>/deployments/<dep>/scale``): only the target replica count changes, running
replicas keep their ids, the other experts are untouched. Serve forbids that API on autoscaled deployments, so
for an autoscaled expert Serve's autoscaler owns the count (between ``min_replicas`` and ``max_replicas``).

Callers score through :class:`actors.serving.client.RewardClient` (deployment handles, numpy in and out).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from actors.serving import metrics as reward_metrics
from configs.serve import ALL_EXPERTS, ServeConfig

log = logging.getLogger(__name__)




# ------------------------------------------------------------------------------------------------ naming
def app_name(cfg: ServeConfig | str, expert: str) -> str:
    """Serve application of ``expert`` (``cfg`` may be the ServeConfig or its ``app_name``)."""
    prefix = cfg if isinstance(cfg, str) else getattr(cfg, "serve", cfg).app_name
    return f"{prefix}-{expert}"


def deployment_name(expert: str) -> str:
    """Serve deployment of ``expert`` ("reward-der")."""
    return f"reward-{expert}"


def route(cfg: ServeConfig, expert: str) -> str | None:
    """HTTP route of ``expert`` or None when its route is off."""
    return f"{cfg.route_prefix.rstrip('/')}/{expert}" if cfg.expert(expert).http else None


def http_url(cfg: ServeConfig, expert: str) -> str:
    """URL of ``expert``'s msgpack route on the running Serve proxy (ValueError when its route is off)."""
    from ray.serve.context import _get_global_client

    path = route(cfg, expert)
    if path is None:
        raise ValueError(f"reward expert {expert!r} has no HTTP route (serve.{expert}.http: false)")
    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}{path}"


# ------------------------------------------------------------------------------------------------ deploy
def _references_store_name(cfg: ServeConfig) -> str:
    return f"{cfg.app_name}-references"


def _put_references(cfg: ServeConfig, references, categories: dict[str, str] | None) -> dict:
    """Keep the reference images in a small detached actor so replicas started later (live scale-up from another
    process, a replaced replica) can still fetch them after the deploying driver is gone."""
    import ray

    if isinstance(references, ray.ObjectRef):
        references = ray.get(references)
    if not isinstance(references, dict) or not references:
        raise ValueError("deploy_rewards: references must be a non-empty dict {concept: [uint8 HWC images]}")
    unknown = sorted(set(categories or {}) - set(references))
    if unknown:
        raise ValueError(f"deploy_rewards: categories given for concepts without references: {unknown}")
    name = _references_store_name(cfg)
    try:
        ray.kill(ray.get_actor(name, namespace="serve"))
    except ValueError:
        pass
    from actors.serving.replica import ReferenceStore

    store = ray.remote(ReferenceStore).options(name=name, namespace="serve", lifetime="detached",
                                               num_cpus=0).remote(references, categories or {})
    ray.get(store.concepts.remote())
    return {"actor": name, "namespace": "serve"}


def ensure_serve(cfg: ServeConfig) -> bool:
    """Start Serve with its HTTP proxy on ``cfg.http_host:cfg.http_port`` unless Serve is running already (then it
    is used as it is: a proxy's address cannot change while Serve runs). Returns True when it was started here."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is not None:
        return False
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port or _free_port(cfg.http_host)})
    return True


def _free_port(host: str) -> int:
    """A port the OS has free on ``host`` now (``serve.http_port: 0``): Serve is given a concrete port, so the routes'
    URLs (:func:`http_url`, Serve's own config) name the port the proxy really listens on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def deployed_apps(cfg) -> list[str]:
    """The expert applications of ``cfg.app_name`` currently known to Serve (any state), in expert order."""
    from ray.serve.context import _get_global_client

    cfg = getattr(cfg, "serve", cfg)
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return []
    apps = set(client.get_serve_details().get("applications", {}))
    return [app_name(cfg, e) for e in ALL_EXPERTS if app_name(cfg, e) in apps]


def build_application(cfg: ServeConfig, expert: str, source: dict | None):
    """The Serve application of one expert (deployment options from its ExpertServeConfig)."""
    from ray import serve

    from actors.serving.replica import RewardReplica

    ecfg = cfg.expert(expert)
    actor_options: dict[str, Any] = {"num_cpus": ecfg.num_cpus, "num_gpus": ecfg.num_gpus}
    if ecfg.resources:
        actor_options["resources"] = dict(ecfg.resources)
    runtime_env = ecfg.actor_runtime_env(expert)   # checks a separate interpreter before anything is deployed
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    options: dict[str, Any] = dict(
        name=deployment_name(expert),
        ray_actor_options=actor_options,
        max_ongoing_requests=ecfg.max_ongoing_requests,
        health_check_period_s=ecfg.health_check_period_s,
        health_check_timeout_s=ecfg.health_check_timeout_s,
        graceful_shutdown_timeout_s=max(5.0, ecfg.timeout_s),
        logging_config={"enable_access_log": False},   # per-call "CALL score OK" lines would flood job logs
    )
    if ecfg.autoscale:
        options["autoscaling_config"] = {
            "min_replicas": ecfg.min_replicas, "initial_replicas": max(1, ecfg.min_replicas),
            "max_replicas": ecfg.max_replicas, "target_ongoing_requests": ecfg.target_ongoing_requests}
    else:
        options["num_replicas"] = ecfg.num_replicas
    return serve.deployment(RewardReplica).options(**options).bind(
        expert, ecfg.expert_config(expert), ecfg.max_batch_size, ecfg.batch_wait_timeout_s, source,
        sorted(c for c, ws in cfg.ensemble.weights.items() if ws.get(expert, 0) > 0))


def deploy_rewards(cfg, data_root=None, references=None, categories: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """Deploy every enabled expert (one application each) and wait until all replicas run: :func:`submit_rewards`
    then :func:`wait_deployed`. Returns ``{expert: DeploymentHandle}``."""
    return wait_deployed(submit_rewards(cfg, data_root=data_root, references=references, categories=categories))


@dataclass
class PendingDeploy:
    """Reward experts submitted to Serve by :func:`submit_rewards` whose replicas may still be starting."""

    cfg: ServeConfig
    """The serving config they were deployed with."""
    submitted_at: float
    """``time.monotonic()`` when they were submitted."""


def submit_rewards(cfg, data_root=None, references=None, categories: dict[str, str] | None = None) -> PendingDeploy:
    """Submit every enabled expert (one application each) to Serve and return without waiting for the replicas, so
    the caller can start other roles meanwhile; :func:`wait_deployed` waits for them.

    Reference images: ``references`` (``{concept: [uint8 HWC]}`` or a Ray ObjectRef to one, with optional
    ``categories`` ``{concept: "human" | "animal" | "object"}``) or ``data_root`` (each replica reads the concepts'
    training images and categories with ``rl.data.reader``; a loaded ``rl.data.reader.ConceptDataset`` may be passed instead of
    the path: its concepts are then shipped as ``references``). ``cfg`` is the ServeConfig or a TrainConfig
    (its ``serve`` section). A replica registers a concept only with experts that its
    category weights in ``cfg.ensemble`` (FER: humans); concepts of unknown category go to every expert.
    """
    import ray
    from ray import serve

    cfg = getattr(cfg, "serve", cfg)
    cfg.validate()
    if references is not None and data_root is not None:
        raise ValueError("deploy_rewards: pass references or data_root, not both")
    if data_root is not None and hasattr(data_root, "concepts"):  # a loaded ConceptDataset
        dataset, data_root = data_root, None
        references = {name: [ref.load() for ref in c.train.references] for name, c in dataset.concepts.items()}
        categories = {name: c.info.category for name, c in dataset.concepts.items()}
    gpus = ray.cluster_resources().get("GPU", 0.0)
    for expert in cfg.enabled:
        if cfg.expert(expert).num_gpus > gpus:
            raise ValueError(f"serve.{expert}.num_gpus = {cfg.expert(expert).num_gpus} but the Ray cluster has "
                             f"{gpus:g} GPU(s); set it to 0 to serve {expert!r} on CPU")
    ensure_serve(cfg)
    source = _put_references(cfg, references, categories) if references is not None else (
        {"data_root": str(data_root)} if data_root is not None else None)
    t0 = time.monotonic()
    targets = [serve.RunTarget(build_application(cfg, e, source), name=app_name(cfg, e), route_prefix=route(cfg, e),
                               external_scaler_enabled=not cfg.expert(e).autoscale) for e in cfg.enabled]
    serve.run_many(targets, wait_for_applications_running=False)  # all experts start in parallel
    return PendingDeploy(cfg, t0)


def wait_deployed(pending: PendingDeploy) -> dict[str, Any]:
    """Wait until every expert of ``pending`` has its replicas running (``serve.deploy_timeout_s`` each); returns
    ``{expert: DeploymentHandle}``."""
    from ray import serve

    cfg, t0 = pending.cfg, pending.submitted_at
    handles = {}
    for expert in cfg.enabled:
        ecfg = cfg.expert(expert)
        target = max(1, ecfg.min_replicas) if ecfg.autoscale else ecfg.num_replicas
        wait_for_replicas(cfg, expert, target, timeout_s=cfg.deploy_timeout_s)
        reward_metrics.set_replicas(expert, target)
        handles[expert] = serve.get_deployment_handle(deployment_name(expert), app_name(cfg, expert))
    log.info("reward experts deployed in %.1fs: %s", time.monotonic() - t0, cfg.enabled)
    return handles


# ------------------------------------------------------------------------------------------ scale / status
def _deployment_details(cfg: ServeConfig | str, expert: str) -> tuple[dict, dict]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(app_name(cfg, expert))
    if app is None:
        raise ValueError(f"reward expert {expert!r} is not deployed (no application {app_name(cfg, expert)!r})")
    return app, app.get("deployments", {}).get(deployment_name(expert), {})


def _status(value) -> str:
    return str(getattr(value, "value", value))


def replicas(cfg: ServeConfig | str, expert: str) -> list[dict]:
    """Replicas of ``expert``: ``[{"replica_id", "state", "actor_name", "pid"}]`` (from the Serve controller)."""
    _, dep = _deployment_details(cfg, expert)
    return [{"replica_id": r["replica_id"], "state": _status(r["state"]),
             "actor_name": r.get("actor_name"), "pid": r.get("pid")} for r in dep.get("replicas", [])]


def wait_for_replicas(cfg: ServeConfig | str, expert: str, n: int, timeout_s: float = 300.0) -> list[dict]:
    """Block until exactly ``n`` replicas of ``expert`` are RUNNING and no others remain; returns them."""
    deadline = time.monotonic() + timeout_s
    while True:
        app, dep = _deployment_details(cfg, expert)
        if _status(app.get("status")) == "DEPLOY_FAILED" or _status(dep.get("status")) == "DEPLOY_FAILED":
            message = (dep.get("message") or app.get("message") or "").strip().splitlines()
            raise RuntimeError(f"reward expert {expert!r} failed to deploy: "
                               f"{message[-1] if message else 'see serve status'}")
        reps = replicas(cfg, expert)
        running = [r for r in reps if r["state"] == "RUNNING"]
        if len(running) == n == len(reps):
            return running
        if time.monotonic() > deadline:
            raise TimeoutError(f"reward expert {expert!r}: {len(running)} of {n} replicas running after "
                               f"{timeout_s:.0f}s (states: {[r['state'] for r in reps]}); see `serve status`")
        time.sleep(0.2)


def scale_expert(expert: str, n: int, cfg: ServeConfig | str = "rewards", wait: bool = True,
                 timeout_s: float = 300.0) -> list[dict]:
    """Set ``expert``'s replica count to ``n`` in place, while it serves; no other expert is touched.

    Uses Serve's external-scaler API, so running replicas keep their ids (scale-down drains the removed ones
    gracefully). Autoscaled experts refuse (Serve's autoscaler owns their count). Returns the replicas
    (after they are running when ``wait``).
    """
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    if n < 0:
        raise ValueError(f"scale_expert: replica count must be >= 0, got {n}")
    _deployment_details(cfg, expert)  # "not deployed" error first
    app = app_name(cfg, expert)
    controller = _get_global_client()._controller
    try:
        ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=deployment_name(expert),
                                                                          app_name=app), n))
    except Exception as exc:  # noqa: BLE001 - re-raised with the expert named
        cause = getattr(exc, "cause", None) or exc
        if "external_scaler_enabled" in str(cause):
            raise ValueError(f"reward expert {expert!r} is autoscaled (serve.{expert}.autoscale: true); Serve "
                             f"owns its replica count. Redeploy with autoscale off to scale it by hand.") from exc
        raise ValueError(f"scale_expert({expert!r}, {n}): {cause}") from exc
    reward_metrics.set_replicas(expert, n)
    log.info("reward expert %s: replica target set to %d", expert, n)
    return wait_for_replicas(cfg, expert, n, timeout_s) if wait else replicas(cfg, expert)


def shutdown_rewards(cfg) -> None:
    """Delete every expert application of ``cfg`` and the reference store (Serve itself keeps running)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    cfg = getattr(cfg, "serve", cfg)
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        deployed = set(client.get_serve_details().get("applications", {}))
        apps = [app_name(cfg, e) for e in ALL_EXPERTS if app_name(cfg, e) in deployed]
        for app in apps:
            serve.delete(app, _blocking=False)
        deadline = time.monotonic() + 120
        while apps and time.monotonic() < deadline:
            if not set(apps) & set(client.get_serve_details().get("applications", {})):
                break
            time.sleep(0.2)
        else:
            if apps:
                log.warning("reward applications still shutting down after 120s: %s", apps)
        for e in ALL_EXPERTS:
            if app_name(cfg, e) in apps:
                reward_metrics.set_replicas(e, 0)
    try:
        ray.kill(ray.get_actor(_references_store_name(cfg), namespace="serve"))
    except ValueError:
        pass
