"""Concept injection as a job of the service: typed config and the Ray actor that trains concepts on one device.

:class:`InjectConfig` composes the service's sections (``ModelConfig``, the dataset section, ``RayConfig``,
``SamplerConfig`` for stage 3) with the injection recipe (``rl.inject.loop.InjectStagesConfig``). Load it with
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
from pathlib import Path
from typing import Any

import ray

from actors.driver.checkpoint import write_text_atomic
from configs.inject import InjectConfig

log = logging.getLogger(__name__)


def checkpoint_dir(run_dir: str | Path, stage: str) -> Path:
    """``<run>/concepts/<stage>``: the GRPO job's ``model.concept_checkpoint_dir`` (one sub-dir per concept)."""
    return Path(run_dir) / "concepts" / stage


class InjectWorker:
    """Trains its concepts' stages on one device (run as a Ray actor by the driver)."""

    def __init__(self, cfg: InjectConfig, concepts: list[str]):
        """Builds the policy (all ``concepts``) on cuda:0 when the actor has a GPU, else CPU."""
        import torch

        from actors.learner.step import concept_specs
        from backbone.build import build_policy
        from rl.data.reader import load_concept_dataset
        from rl.inject.loop import ConceptInjector

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

            from rl.inject.initial_rows import facenet_mean_embedding

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

