"""Reward experts on Ray Serve (design D13): config, deployment, live per-expert scaling, status, shutdown.

Layout: every expert is its own Serve *application* ``<app_name>-<expert>`` holding one deployment
``reward-<expert>`` (the replica class is :class:`actors.reward_replica.RewardReplica`). One application per
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

Callers score through :class:`actors.reward_client.RewardClient` (deployment handles, numpy in and out).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from actors import reward_metrics
from actors.ray_env import LOOPBACK
from rewards.ensemble import EnsembleConfig

log = logging.getLogger(__name__)

ALL_EXPERTS = ("tier", "ber", "der", "fer", "clip", "unipercept")


class RewardRequestError(ValueError):
    """A malformed scoring request (wrong dtype/shape, empty batch, missing field, bad msgpack body)."""


class RewardServiceError(RuntimeError):
    """A reward expert could not score a request; names the expert and the cause."""

    def __init__(self, expert: str, cause: str):
        super().__init__(f"reward expert {expert!r} failed: {cause}")
        self.expert = expert
        self.cause = cause


_INTERPRETER_KEYS = ("py_executable", "pip", "uv", "conda", "container", "image_uri")
"""runtime_env fields that choose the replicas' interpreter themselves."""


@dataclass
class ExpertServeConfig:
    """How one expert is served: replicas, resources, batching, client policy and the expert's own config."""

    num_replicas: int = 1
    """Replicas when ``autoscale`` is off (change it live with ``python -m launch.scale EXPERT N``)."""
    autoscale: bool = False
    """Let Serve scale this expert on ongoing requests between ``min_replicas`` and ``max_replicas``."""
    min_replicas: int = 1
    """Autoscaling lower bound (also the initial count)."""
    max_replicas: int = 4
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 2.0
    """Autoscaling target: ongoing requests per replica."""
    num_cpus: float = 1.0
    """CPUs reserved per replica (fractions allowed)."""
    num_gpus: float = 0.25
    """GPUs reserved per replica (fractions share a GPU; 0 = CPU). With GPUs the expert runs on "cuda"."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each replica requires, e.g. {reward_node: 0.01} to keep the experts on the nodes started
    with ``ray start --resources '{"reward_node": 1}'`` (empty = any node)."""
    max_batch_size: int = 16
    """``@serve.batch``: most requests merged into one expert call."""
    batch_wait_timeout_s: float = 0.01
    """``@serve.batch``: longest wait for a batch to fill."""
    max_ongoing_requests: int = 32
    """Requests a replica accepts at once (must be >= max_batch_size for batches to fill)."""
    timeout_s: float = 60.0
    """Client: seconds one attempt may take before it is cancelled and retried."""
    retries: int = 2
    """Client: extra attempts after a failed one (replica died, timeout, error)."""
    required: bool = True
    """Client: a failure after all retries raises (True) or drops the expert for that step (False)."""
    http: bool = False
    """Expose ``POST <route_prefix>/<expert>`` with msgpack bodies (for experts in other Python environments)."""
    health_check_period_s: float = 10.0
    """Seconds between replica health checks (a one-sample self-score)."""
    health_check_timeout_s: float = 30.0
    """A health check slower than this marks the replica unhealthy (Serve replaces it)."""
    preset: str = "real"
    """Expert config preset: "real" (the expert config's defaults) or "tiny" (its ``tiny()``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields set on the expert's own config (rewards/<expert>.py), e.g. {"model_path": "/models/dinov2"}."""
    python: str = "auto"
    """Interpreter the replicas run in: "auto" = the expert's own environment if it has one (unipercept:
    .venv-unipercept/bin/python, built by ``python -m launch.build_reward_env unipercept``) unless ``runtime_env``
    picks the interpreter, else the driver's; "" = the driver's; or a path (relative = from the repository root).
    Passed to Ray as ``runtime_env.py_executable``, so it must exist at this path on every node; deploying checks
    it first and fails with the fix."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Extra Ray runtime_env of the replicas (e.g. ``{"env_vars": {...}}``, or ``{"pip": {...}}`` to let Ray build
    the environment on each node instead of ``python``; see the README)."""

    def validate(self) -> None:
        """Bounds of every count and time (errors name the field)."""
        if self.num_replicas < 0 or self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replicas: num_replicas={self.num_replicas}, min_replicas={self.min_replicas}, "
                             f"max_replicas={self.max_replicas} must satisfy 0 <= min <= max, max >= 1")
        if self.max_batch_size < 1 or self.max_ongoing_requests < 1:
            raise ValueError("max_batch_size and max_ongoing_requests must be >= 1")
        if self.timeout_s <= 0 or self.retries < 0 or self.batch_wait_timeout_s < 0:
            raise ValueError("timeout_s must be > 0, retries and batch_wait_timeout_s >= 0")
        if self.preset not in ("real", "tiny"):
            raise ValueError(f"preset must be 'real' or 'tiny', got {self.preset!r}")
        if not isinstance(self.python, str):
            raise ValueError(f"python must be a path string ('' = the driver's interpreter), got {self.python!r}")
        if not isinstance(self.runtime_env, dict):
            raise ValueError(f"runtime_env must be a mapping, got {type(self.runtime_env).__name__}")
        explicit = self.python not in ("", "auto")
        clash = sorted(k for k in _INTERPRETER_KEYS if k in self.runtime_env and (explicit or k == "py_executable"))
        if clash:
            raise ValueError(f"runtime_env.{clash[0]} conflicts with python = {self.python!r}: the interpreter is set "
                             f"by 'python' (set it to '' or 'auto' to let runtime_env choose)")

    def interpreter(self, expert: str) -> str:
        """The ``python`` setting resolved for ``expert`` ("" = the driver's interpreter or runtime_env's choice)."""
        if self.python != "auto":
            return self.python
        if any(k in self.runtime_env for k in _INTERPRETER_KEYS):
            return ""
        return EXPERT_PYTHON.get(expert, "")

    def actor_runtime_env(self, expert: str) -> dict[str, Any] | None:
        """The replicas' Ray runtime_env: ``runtime_env`` plus ``py_executable`` from ``python`` after checking that
        interpreter (a missing, stale or broken environment raises an ExpertEnvError saying how to fix it)."""
        env = dict(self.runtime_env)
        python = self.interpreter(expert)
        if python:
            from rewards.expert_env import check_python, resolve_python

            resolved = resolve_python(python)
            check_python(resolved, expert)
            env["py_executable"] = str(resolved)
        return env or None

    def expert_config(self, name: str):
        """The expert's config dataclass: preset + overrides; a GPU reservation moves a CPU expert to "cuda"."""
        from rewards.registry import config_class

        cls = config_class(name)
        cfg = cls.tiny() if self.preset == "tiny" else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"serve.{name}.overrides: unknown field(s) {unknown} of {cls.__name__}")
        cfg = dataclasses.replace(cfg, **self.overrides)
        if self.num_gpus > 0 and cfg.device == "cpu" and "device" not in self.overrides:
            cfg = dataclasses.replace(cfg, device="cuda")
        return cfg


UNIPERCEPT_PYTHON = ".venv-unipercept/bin/python"
"""Default interpreter of the UniPercept replicas: the overlay environment ``launch.build_reward_env`` builds."""

EXPERT_PYTHON = {"unipercept": UNIPERCEPT_PYTHON}
"""What ``python: auto`` means per expert (experts not listed run in the driver's interpreter)."""


def _tiny_expert(**kw) -> ExpertServeConfig:
    return ExpertServeConfig(**{**dict(num_cpus=0.1, num_gpus=0.0, max_batch_size=8, batch_wait_timeout_s=0.005,
                                       max_ongoing_requests=16, timeout_s=30.0, retries=2, health_check_period_s=2.0,
                                       health_check_timeout_s=30.0, preset="tiny"), **kw})


@dataclass
class ServeConfig:
    """Ray Serve deployments of the reward experts, the client policy and the ensemble weights."""

    enabled: list[str] = field(default_factory=lambda: ["tier", "ber", "der", "fer"])
    """Experts to deploy (any of tier, ber, der, fer, clip, unipercept)."""
    tier: ExpertServeConfig = field(default_factory=ExpertServeConfig)
    """TIER (text-instruct, ERNIE embeddings)."""
    ber: ExpertServeConfig = field(default_factory=ExpertServeConfig)
    """BER (BLIP-2 image-text matching)."""
    der: ExpertServeConfig = field(default_factory=ExpertServeConfig)
    """DER (DINOv2 similarity to the concept's reference images)."""
    fer: ExpertServeConfig = field(default_factory=ExpertServeConfig)
    """FER (FaceNet similarity to the reference faces; humans only)."""
    clip: ExpertServeConfig = field(default_factory=ExpertServeConfig)
    """CLIP-T (image-prompt similarity)."""
    unipercept: ExpertServeConfig = field(default_factory=ExpertServeConfig)
    """UniPercept (perceptual IAA / IQA / ISTA; ``python: auto`` runs it in its own environment, .venv-unipercept)."""
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    """Ensemble weights per category and the experts that may never be dropped."""
    app_name: str = "rewards"
    """Serve application name prefix: expert ``e`` lives in application ``<app_name>-<e>``."""
    http_host: str = LOOPBACK
    """Bind address of Serve's HTTP proxy (loopback unless you mean to expose it)."""
    http_port: int = 8000
    """Port of Serve's HTTP proxy (used only when Serve is started here)."""
    route_prefix: str = "/rewards"
    """HTTP routes are ``<route_prefix>/<expert>`` for experts with ``http: true``."""
    retry_backoff_s: float = 0.5
    """Client: pause before a retry, times the attempt number (lets Serve replace a dead replica)."""
    deploy_timeout_s: float = 600.0
    """Seconds ``deploy_rewards`` / ``scale_expert(wait=True)`` wait for replicas to be running."""
    mode: str = "owned"
    """"owned": the run deploys its experts (replacing stale applications of the same names left by a crashed
    earlier run) and deletes them when it ends, however it ends (success, error, SIGTERM, Ctrl-C); Serve itself is
    shut down too when the run started it. "shared": a reward pool started separately (``deploy_rewards`` / another
    job) under ``app_name`` is used as it is and never deployed, scaled or deleted by the run; a missing expert
    application is an error before any work starts."""

    def validate(self) -> None:
        """Known, unique expert names; each expert's own bounds."""
        unknown = sorted(set(self.enabled) - set(ALL_EXPERTS))
        if unknown or len(set(self.enabled)) != len(self.enabled):
            raise ValueError(f"serve.enabled: {self.enabled} must be distinct names from {list(ALL_EXPERTS)}")
        for name in ALL_EXPERTS:
            try:
                self.expert(name).validate()
            except ValueError as exc:
                raise ValueError(f"serve.{name}: {exc}") from exc
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")
        if self.mode not in ("owned", "shared"):
            raise ValueError(f"serve.mode must be 'owned' or 'shared', got {self.mode!r}")

    def expert(self, name: str) -> ExpertServeConfig:
        """The serving config of expert ``name``."""
        if name not in ALL_EXPERTS:
            raise ValueError(f"unknown reward expert {name!r}; known: {list(ALL_EXPERTS)}")
        return getattr(self, name)

    @classmethod
    def tiny(cls) -> "ServeConfig":
        """CPU test set-up: tiny experts, 0.1 CPU per replica, short timeouts and health checks."""
        return cls(tier=_tiny_expert(), ber=_tiny_expert(), der=_tiny_expert(), fer=_tiny_expert(),
                   clip=_tiny_expert(), unipercept=_tiny_expert(timeout_s=60.0),
                   http_port=8123, retry_backoff_s=0.2, deploy_timeout_s=300.0)


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
    from actors.reward_replica import ReferenceStore

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
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    return True


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

    from actors.reward_replica import RewardReplica

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
    """Deploy every enabled expert (one application each) and wait until all replicas run.

    Reference images: ``references`` (``{concept: [uint8 HWC]}`` or a Ray ObjectRef to one, with optional
    ``categories`` ``{concept: "human" | "animal" | "object"}``) or ``data_root`` (each replica reads the concepts'
    training images and categories with ``rl.data``; a loaded ``rl.data.ConceptDataset`` may be passed instead of
    the path: its concepts are then shipped as ``references``). ``cfg`` is the ServeConfig or a TrainConfig
    (its ``serve`` section). A replica registers a concept only with experts that its
    category weights in ``cfg.ensemble`` (FER: humans); concepts of unknown category go to every expert.
    Returns ``{expert: DeploymentHandle}``.
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
