"""Concept injection as a job of the service: typed config and the Ray actor that trains concepts on one device.

:class:`InjectConfig` composes the service's sections (``ModelConfig``, the dataset section, ``RayConfig``,
``SamplerConfig`` for stage 3) with the injection recipe (``rl.inject.InjectStagesConfig``). Load it with
:func:`load_inject_config` (YAML + ``key.sub=value`` overrides, same loader as ``configs/schema.py``).

:class:`InjectWorker` (a Ray actor, one device) builds the policy with every concept it trains (all U+G+S tokens;
concepts are independent because each stage masks the other concepts' logit columns), then runs its job list
(concept × stage) one epoch per :meth:`InjectWorker.next_epoch` call, so the driver logs metrics and progress while
it trains. Checkpoints: ``<run>/concepts/<stage>/<concept>/epoch_N_{embed,lm_head_weight,lm_head_bias}.pt``
(each file atomic) and ``latest_epoch`` (written atomically after the three files) every ``save_every`` epochs and
after the last one. No DeepSpeed: the trainable state is a few dozen rows, a plain torch AdamW on one device is all
it needs; concepts scale out over ``worker.num_workers`` actors instead (dealt round-robin).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.checkpoint import write_text_atomic
from backbone.build import ModelConfig
from backbone.maskgit import SamplerConfig
from configs.loader import apply_overrides, from_dict, load_yaml
from configs.schema import DataConfig, RayConfig, resolve_config_path
from rl.inject import InjectStagesConfig

log = logging.getLogger(__name__)


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


def checkpoint_dir(run_dir: str | Path, stage: str) -> Path:
    """``<run>/concepts/<stage>``: the GRPO job's ``model.concept_checkpoint_dir`` (one sub-dir per concept)."""
    return Path(run_dir) / "concepts" / stage


class InjectWorker:
    """Trains its concepts' stages on one device (run as a Ray actor by the driver)."""

    def __init__(self, cfg: InjectConfig, concepts: list[str]):
        """Builds the policy (all ``concepts``) on cuda:0 when the actor has a GPU, else CPU."""
        import torch

        from actors.learner_step import concept_specs
        from backbone.build import build_policy
        from rl.data import load_concept_dataset
        from rl.inject import ConceptInjector

        t0 = time.perf_counter()
        self.cfg = cfg
        if cfg.worker.num_threads > 0:
            torch.set_num_threads(cfg.worker.num_threads)
        on_gpu = cfg.worker.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        self.dataset = load_concept_dataset(cfg.data.root, concepts=concepts, config=cfg.data.reader)
        self.policy = build_policy(cfg.model, concept_specs(self.dataset), device=self.device)
        face = None
        if cfg.inject.init.face is not None:
            import functools

            from rl.inject_init import facenet_mean_embedding

            face = functools.partial(facenet_mean_embedding, cfg.inject.init.face)
        m = cfg.model
        self.injectors = {c: ConceptInjector(self.policy, self.dataset, c, cfg.inject,
                                             (m.num_understanding_tokens, m.num_generation_tokens,
                                              m.num_stage3_tokens), cfg.sampler, cfg.run.seed, face)
                          for c in concepts}
        self.jobs = [(c, s) for c in concepts for s in cfg.inject.stages]
        self.current: tuple[str, str] | None = None
        self.setup_s = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        """Device, setup time and the job list."""
        return {"device": str(self.device), "setup_s": self.setup_s, "jobs": list(self.jobs)}

    def next_epoch(self) -> dict[str, Any] | None:
        """Run the next epoch of the job list (starting / ending stages as needed); None when all are done.

        Returns ``{concept, stage, epoch, epochs, records, saved (dir or None), stage_done, extra, init,
        seconds}``."""
        if self.current is None:
            if not self.jobs:
                return None
            self.current = self.jobs.pop(0)
            c, s = self.current
            plan = self.injectors[c].begin_stage(s)
            log.info("concept %s: %s trains %s (rows saved: %s)", c, s, plan.trains, plan.exists)
        c, s = self.current
        inj = self.injectors[c]
        t0 = time.perf_counter()
        records = inj.run_epoch()
        sc = inj.sc
        saved = None
        if inj.epoch % sc.save_every == 0 or inj.epoch == sc.epochs:
            out = checkpoint_dir(self.cfg.run_dir, s) / c
            inj.save(out)
            write_text_atomic(out / "latest_epoch", f"{inj.epoch}\n")
            saved = str(out)
        done = inj.epoch >= sc.epochs
        report = {"concept": c, "stage": s, "epoch": inj.epoch, "epochs": sc.epochs, "records": records,
                  "saved": saved, "stage_done": done, "extra": dict(inj.extra), "init": dict(inj.init_notes),
                  "rows": len(inj.rows(inj.plan.exists)), "seconds": time.perf_counter() - t0}
        if done:
            inj.end_stage()
            self.current = None
        return report


RemoteInjectWorker = ray.remote(InjectWorker)
"""The Ray actor class (``RemoteInjectWorker.options(num_cpus=…, num_gpus=…).remote(cfg, concepts)``)."""


def deal(concepts: list[str], num_workers: int) -> list[list[str]]:
    """Concepts dealt round-robin over at most ``num_workers`` non-empty lists."""
    n = max(1, min(num_workers, len(concepts)))
    return [concepts[i::n] for i in range(n)]

