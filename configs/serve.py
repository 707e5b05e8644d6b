"""Reward-serving configuration: one section per expert (replicas, resources, batching, client policy) and the
ensemble weights."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rewards.config import EnsembleConfig

LOOPBACK = "127.0.0.1"
"""Default bind address of every service port."""


ALL_EXPERTS = ("tier", "ber", "der", "fer", "clip", "unipercept")


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
    http_port: int = 0
    """Port of Serve's HTTP proxy (used only when Serve is started here): 0 = a free port the OS picks, so runs on
    a shared host never collide; set a port when outside clients call the experts' HTTP routes."""
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
                   retry_backoff_s=0.2, deploy_timeout_s=300.0)
