"""Concept-injection job configuration: the service's sections plus the injection recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from backbone.config import ModelConfig, SamplerConfig
from configs.loader import apply_overrides, from_dict, load_yaml
from configs.schema import DataConfig, RayConfig, resolve_config_path
from rl.inject.loop import InjectStagesConfig


@dataclass
class InjectRunConfig:
    """Where the injection job writes and its seed."""

    name: str = "inject"
    """Run name; the run folder is ``<output_root>/<name>``."""
    output_root: str = "runs"
    """Folder holding run folders (made absolute at launch; use shared storage with several nodes)."""
    seed: int = 0
    """Seed of every data order, masking draw, init noise and stage-3 generation."""
    tensorboard: bool = True
    """Also write TensorBoard event files in the run folder."""
    log_every: int = 1
    """Print a progress line every K epochs."""


@dataclass
class WorkerConfig:
    """The injection actors."""

    num_workers: int = 1
    """Actors (one device each); concepts are dealt round-robin over them."""
    num_cpus: float = 1.0
    """CPUs reserved per actor."""
    num_gpus: float = 0.0
    """GPUs reserved per actor (1 on a GPU node; the actor uses cuda:0 when it has a GPU)."""
    num_threads: int = 0
    """torch CPU threads inside the actor (0 = torch's default)."""
    epoch_timeout_s: float = 3600.0
    """Bound on one epoch (incl. the stage-3 generation); a worker that does not answer in time fails the job."""


@dataclass
class InjectConfig:
    """Everything an injection job needs (``python -m launch.inject --config …``)."""

    run: InjectRunConfig = field(default_factory=InjectRunConfig)
    """Run folder and seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """The concept dataset (``concepts``: which to inject; empty = all)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Show-o, tokenizer, MAGVIT-v2; token counts U / G / S per concept (concept_checkpoint_dir must be unset)."""
    inject: InjectStagesConfig = field(default_factory=InjectStagesConfig)
    """Stages, optimizers, loss weights, inits, batch sizes."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """MaskGIT sampling for the stage-3 generations."""
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    """Injection actors."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Joining or starting Ray."""

    def validate(self) -> None:
        """Cross-section checks."""
        m, st = self.model, self.inject.stages
        if m.concept_checkpoint_dir is not None:
            raise ValueError("model.concept_checkpoint_dir must be unset for injection (it is what injection "
                             "produces; the GRPO job loads it)")
        if m.num_understanding_tokens < 1:
            raise ValueError("model.num_understanding_tokens must be >= 1 (k-means init)")
        if ("stage2" in st or "joint" in st) and m.num_generation_tokens < 1:
            raise ValueError("stage2/joint need model.num_generation_tokens >= 1")
        if "stage3" in st and m.num_stage3_tokens < 1:
            raise ValueError("stage3 needs model.num_stage3_tokens >= 1 (D10: 8)")
        if self.worker.num_workers < 1:
            raise ValueError("worker.num_workers must be >= 1")

    @property
    def run_dir(self) -> Path:
        """Absolute run folder."""
        return Path(self.run.output_root).expanduser().resolve() / self.run.name


def load_inject_config(path: str | Path | None = None, overrides: list[str] | None = None) -> InjectConfig:
    """YAML (a path or a name in configs/, e.g. ``inject_tiny``) + ``key.sub=value`` overrides -> InjectConfig."""
    data = load_yaml(resolve_config_path(path)) if path else {}
    return from_dict(InjectConfig, apply_overrides(data, list(overrides or [])))
