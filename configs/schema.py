"""The service's typed configuration: one dataclass per component, composed into :class:`TrainConfig`.

Component dataclasses live beside the code they configure (``backbone.build.ModelConfig``,
``backbone.maskgit.SamplerConfig``, ``rl.grpo.objective.ObjectiveConfig``, ``rl.grpo.dsog.DSOGConfig``, …); this module
owns only the run-level sections and the composition. Defaults are the paper's Table 4 / the released code's
values for the real 8×H100 job; ``configs/tiny_cpu.yaml`` overrides them for the embedded CPU default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from backbone.config import ModelConfig, SamplerConfig
from configs.learner import LearnerConfig, SyncConfig
from configs.loader import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from configs.placement import PlacementConfig
from configs.rollout import RolloutConfig
from configs.serve import ServeConfig
from configs.trackers import TrackerConfig, check_trackers
from rl.data.reader import DataConfig as ReaderConfig
from rl.eval.config import EvalConfig
from rl.grpo.config import DSOGConfig, ObjectiveConfig

CONFIG_DIR = Path(__file__).resolve().parent


@dataclass
class RunConfig:
    """Where a run writes, how long it runs and how often it saves."""

    name: str = "unictask-grpo"
    """Run name; the run folder is ``<output_root>/<name>``."""
    output_root: str = "runs"
    """Folder that holds run folders. Relative paths resolve against the current directory at launch and are
    turned into absolute paths (a ``ray job submit --working-dir`` uploads code, not runs: use an absolute path
    on a cluster)."""
    steps: int = 100
    """Number of GRPO steps (paper Table 4: 100)."""
    seed: int = 0
    """Run seed. Every random draw is derived from (seed, step, prompt, sample, attempt) (design D7)."""
    prompts_per_step: int = 1
    """Prompts (groups) per GRPO step: the paper's batch size (Table 4: 1)."""
    checkpoint_every: int = 10
    """Write a checkpoint every K steps (and at the end and on SIGTERM)."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are deleted after a newer one is complete."""
    image_grid_every: int = 10
    """Save a PNG grid of generated images every K steps (0 = never)."""
    samples_every: int = 1
    """Record every sample of every K-th step in ``<run>/samples/`` (0 = never): ``step_<N>.jsonl`` (one row per
    sample: task, question, answer, compound prompt, reward text, per-expert rewards, advantage, DSOG attempts) and
    the kept images as PNG (``python -m launch.inspect <run>`` shows them)."""
    eval_every: int = 0
    """Run the held-out evaluation every K steps (0 = never)."""
    log_every: int = 1
    """Print the metrics line every K steps."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard event files in the run folder (only while "tensorboard" is in
    ``run.trackers``)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers beside ``metrics.jsonl``: any of tensorboard, wandb, mlflow (wandb and MLflow need
    ``pip install -e '.[trackers]'``; they log the same scalars, the config, image grids and reward curves)."""
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    """Settings of the wandb / MLflow trackers (offline stores in the run folder by default)."""
    max_learner_restarts: int = 3
    """A dead or hung learner rank tears the learner group down and rebuilds it from the last checkpoint; after this
    many rebuilds in one run the run stops with an error."""
    overlap: Literal["none", "one_step"] = "none"
    """"none": each step's rollout, update and weight sync run one after the other (on-policy; D4's old log-probs
    = the learner's own). "one_step": the rollout of step k+1 runs on the rollout actors while the learner updates
    on step k (one-step off-policy, as verl's one_step_off_policy and OpenRLHF's async mode): a step takes
    max(rollout, update) + sync instead of their sum. Step k+1's samples then come from the weights before update
    k, so the PPO ratio uses the rollout's recorded (behaviour) log-probs as old log-probs and
    ``learn/policy_lag`` is 1. The DSOG threshold does not lag (step k+1's rollout starts after step k's scores
    updated it). Checkpoints carry the finished next-step rollout, so resume stays exact."""

    def validate(self) -> None:
        """Reject impossible values."""
        if self.steps < 0 or self.prompts_per_step < 1:
            raise ValueError("run.steps must be >= 0 and run.prompts_per_step >= 1")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            raise ValueError("run.checkpoint_every and run.keep_last must be >= 1")
        if self.samples_every < 0:
            raise ValueError(f"run.samples_every must be >= 0 (0 = no sample records), got {self.samples_every}")
        check_trackers(self.trackers)
        self.tracker.validate()
        if self.overlap not in ("none", "one_step"):
            raise ValueError(f"run.overlap must be 'none' or 'one_step', got {self.overlap!r}")


@dataclass
class DataConfig:
    """The concept dataset (UniCTokens / UnifyBench++ layout)."""

    root: str = "data/sample"
    """Dataset root (holds ``concepts_list.json`` and ``concept/``). Relative paths resolve against the
    current directory at launch."""
    make_sample_if_missing: bool = False
    """Create the bundled sample dataset at ``root`` when it does not exist (the tiny CPU default)."""
    concepts: list[str] = field(default_factory=list)
    """Concepts to train; empty = every concept in ``concepts_list.json``."""
    text_task_ratio: float = 0.5
    """Share of text-only reasoning tasks versus visual-instruct tasks (paper: 1:1)."""
    prompt_style: Literal["released", "sft"] = "released"
    """How understanding questions, compound prompts and reward texts are written (rl/grpo/tasks.py): "released" =
    byte for byte the released GRPO code (sync_r1_grpo/grpo.py), the default so runs on the released data and
    checkpoints see the paper's prompts; "sft" = the UniCTokens-SFT layout (the "<c> is <token_0..15>." prefix on
    every question, CP = "A photo of <tokens> <c>. " + IR, reward text with <c> → class word)."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """Checks applied wherever the dataset is read (image size limits, decoding every image up front, the
    train / held-out split of t2i_conditions.json)."""

    def validate(self) -> None:
        """Reject impossible values."""
        if not 0.0 <= self.text_task_ratio <= 1.0:
            raise ValueError("data.text_task_ratio must be in [0, 1]")
        self.reader.validate()


@dataclass
class RayConfig:
    """How the driver joins or starts Ray."""

    address: str | None = None
    """Cluster address; None = use ``RAY_ADDRESS`` if set (as under ``ray job submit``), else start a local
    cluster bound to 127.0.0.1."""
    num_cpus: int | None = None
    """CPUs of a locally started cluster (None = all)."""
    num_gpus: int | None = None
    """GPUs of a locally started cluster (None = all)."""
    include_dashboard: bool = False
    """Start the dashboard with a local cluster."""
    dashboard_host: str = "127.0.0.1"
    """Dashboard bind address of a local cluster; never 0.0.0.0 unless you set it."""
    metrics_export_port: int | None = None
    """Prometheus metrics port of a local cluster (None = Ray's choice)."""


@dataclass
class TrainConfig:
    """Everything a UniCTask-GRPO run needs. Load with :func:`load_config`."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run folder, length, seed and save cadence."""
    data: DataConfig = field(default_factory=DataConfig)
    """The concept dataset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Show-o, tokenizer, MAGVIT-v2 and concept-token checkpoints."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """MaskGIT sampling (T, CFG scale, schedule)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout actors: count, resources, group size G, answer sampling."""
    dsog: DSOGConfig = field(default_factory=DSOGConfig)
    """Dynamic screening at an early MaskGIT step (DSOG)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Dr.GRPO objective: clip ε, KL β, α weights, normalisers."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner group: ranks, DeepSpeed ZeRO stage, optimizer."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """Learner → rollout weight sync."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Layout of learner and rollout actors (split or colocated placement groups)."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Reward experts served on Ray Serve, with the ensemble weights."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation (``launch.evaluate`` and every ``run.eval_every`` steps during training)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Joining or starting Ray."""

    def validate(self) -> None:
        """Cross-section checks."""
        if self.dsog.enabled and self.dsog.screen_step >= self.sampler.timesteps:
            raise ValueError(f"dsog.screen_step ({self.dsog.screen_step}) must be < sampler.timesteps "
                             f"({self.sampler.timesteps})")
        if self.objective.max_answer_tokens < self.rollout.answer_max_new_tokens:
            raise ValueError(f"objective.max_answer_tokens ({self.objective.max_answer_tokens}) must be >= "
                             f"rollout.answer_max_new_tokens ({self.rollout.answer_max_new_tokens}): it is the "
                             "constant answer normaliser L_text (D5)")
        if self.dsog.enabled and self.dsog.scorer not in self.serve.enabled:
            raise ValueError(f"dsog.scorer {self.dsog.scorer!r} must be deployed: add it to serve.enabled "
                             f"({self.serve.enabled})")

    @property
    def run_dir(self) -> Path:
        """Absolute run folder."""
        return (Path(self.run.output_root).expanduser().resolve() / self.run.name)


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a bare name looked up in ``configs/`` (``tiny_cpu`` → configs/tiny_cpu.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    data = load_yaml(resolve_config_path(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(TrainConfig, data)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    """The config as plain nested dicts (what is saved beside checkpoints)."""
    return to_dict(cfg)


def config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a config saved with :func:`config_to_dict`."""
    return from_dict(TrainConfig, data)
