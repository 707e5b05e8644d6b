"""UniCTokens concept injection (stages 1–3 and joint) on one concept of a built policy; pure torch, no Ray.

Row groups of a concept (design D10; ``ConceptTokens.all_ids`` order, contiguous): ``<c>``, U understanding
tokens, G generation tokens, S stage-3 tokens. The policy is built once with all U+G+S tokens; a stage trains some
groups, masks the logit columns of the groups that do not exist yet at that stage (and of every other concept) to
-inf, and saves the rows that exist at its end in UniCTokens' format:

======== ========================== ===================================================== ===============
stage    trains                      loss                                                  saves (rows)
======== ========================== ===================================================== ===============
stage1   <c> + understanding         mmu (understanding data)                              1+U   (17)
stage2   <c> + understanding + gen   0.8·t2i + 0.2·mmu                                     1+U+G (25)
stage3   stage-3 tokens              mmu on understanding data + stage-3 diff data         1+U+G+S (33)
joint    every group at once         0.8·t2i + 0.2·mmu (no diff data: a cold start)        1+U+G(+S)
======== ========================== ===================================================== ===============

A group is initialised (``rl/inject/initial_rows.py``) right before the first stage that trains it. Stage 3 ("generation as
perception"): with the stage-2 rows, the MaskGIT sampler generates ``stage3.num_images`` images of the t2i prompt
and records the predicted grids at steps 10 and 35 (of 50, scaled to T). The diff-masked grid of a step keeps the
final codes where that step's prediction differs from the final grid (the detail the model settled late) and the
black image's codes elsewhere; each diff image becomes two understanding items (positive recognition, profile),
trained with the stage-3 tokens in the system prefix, together with the stage-1 understanding data. Only the
stage-3 rows train (the t2i prompt does not contain them, so no t2i term).

Only the trained rows change: ``restrict_grads_to_rows`` + ``RowDecayAdamW`` (every other row is bit-identical).
An epoch is one pass over the stage's primary data (t2i images in stage 2 / joint, else the mmu items) in a seeded
order; the other stream cycles through its own seeded orders.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backbone.concepts import RowDecayAdamW, restrict_grads_to_rows, save_concept_checkpoint
from backbone.config import SamplerConfig
from backbone.tokenizer import ConceptTokens
from rl.grpo.seeding import make_generator, sample_seed
from rl.grpo.tasks import ConceptPromptTokens
from rl.inject.data import Stage3Config
from rl.inject.initial_rows import InitConfig
from rl.inject import data as D
from rl.inject import initial_rows as I

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "stage3", "joint")
GROUPS = ("concept", "understanding", "generation", "stage3")


@dataclass
class StageConfig:
    """Optimizer, length and loss weights of one stage (AdamW on the concept rows only)."""

    epochs: int = 20
    """Epochs (UniCTokens: 20)."""
    save_every: int = 5
    """Save a checkpoint every K epochs (UniCTokens: 5) and after the last epoch."""
    lr: float = 1e-3
    """AdamW learning rate (UniCTokens: 1e-3, constant)."""
    weight_decay: float = 1e-3
    """Decoupled weight decay on the trained rows (UniCTokens: 1e-4 stage 1, 1e-3 stage 2)."""
    eps: float = 1e-8
    """AdamW epsilon (UniCTokens: 1e-6 stage 1, 1e-8 stage 2)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch defaults)."""
    t2i_weight: float = 0.8
    """Weight of Show-o's t2i loss (UniCTokens stage 2: 0.8; 0 in stages 1 and 3)."""
    mmu_weight: float = 0.2
    """Weight of the understanding (mmu) loss (UniCTokens stage 2: 0.2; 1 in stages 1 and 3)."""

    def validate(self, name: str = "stage") -> None:
        """Reject impossible values."""
        if self.epochs < 1 or self.save_every < 1:
            raise ValueError(f"inject.{name}: epochs and save_every must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"inject.{name}: lr and eps must be > 0, weight_decay >= 0")
        if self.t2i_weight < 0 or self.mmu_weight < 0 or self.t2i_weight + self.mmu_weight == 0:
            raise ValueError(f"inject.{name}: loss weights must be >= 0 and not both 0")


@dataclass
class InjectStagesConfig:
    """What the injection job trains. Defaults: UniCTokens' recipe (research notes B2)."""

    stages: list[str] = field(default_factory=lambda: ["stage1", "stage2"])
    """Stages in order: a subsequence of stage1, stage2, stage3, or joint (optionally followed by stage3)."""
    stage1: StageConfig = field(default_factory=lambda: StageConfig(weight_decay=1e-4, eps=1e-6, t2i_weight=0.0,
                                                                    mmu_weight=1.0))
    """Understanding warm-up: AdamW lr 1e-3, wd 1e-4, eps 1e-6, 20 epochs, mmu only."""
    stage2: StageConfig = field(default_factory=StageConfig)
    """Bootstrapping generation: AdamW lr 1e-3, wd 1e-3, eps 1e-8, 20 epochs, 0.8·t2i + 0.2·mmu."""
    stage3: StageConfig = field(default_factory=lambda: StageConfig(t2i_weight=0.0, mmu_weight=1.0))
    """Generation as perception: stage-2 optimizer values (the notes give none for stage 3), mmu only."""
    joint: StageConfig = field(default_factory=StageConfig)
    """All groups at once with the stage-2 recipe (the cheap cold start)."""
    stage3_data: Stage3Config = field(default_factory=Stage3Config)
    """Stage-3 generation and diff settings."""
    init: InitConfig = field(default_factory=InitConfig)
    """Row initialisation."""
    mmu_batch_size: int = 4
    """Understanding items per step (our choice)."""
    t2i_batch_size: int = 4
    """T2I images per step (our choice)."""
    max_text_len: int = 128
    """Show-o's t2i text block length minus one (128)."""
    random_flip: bool = True
    """Randomly mirror T2I training images (UniCTokens' image_transform flips by default); mmu images never."""
    amp: str = "none"
    """Autocast dtype of the forward passes: "none" or "bfloat16" (CUDA)."""

    @classmethod
    def tiny(cls) -> "InjectStagesConfig":
        """Few epochs and images (CPU)."""
        return cls(stage1=StageConfig(epochs=2, save_every=1, weight_decay=1e-4, eps=1e-6, t2i_weight=0.0,
                                      mmu_weight=1.0), stage2=StageConfig(epochs=2, save_every=1),
                   stage3=StageConfig(epochs=2, save_every=1, t2i_weight=0.0, mmu_weight=1.0),
                   joint=StageConfig(epochs=2, save_every=1), stage3_data=Stage3Config(num_images=2))

    def validate(self) -> None:
        """Reject impossible stage lists and values."""
        st = list(self.stages)
        if not st or any(s not in STAGES for s in st) or len(set(st)) != len(st):
            raise ValueError(f"inject.stages must be distinct names from {list(STAGES)}, got {st}")
        allowed = (["stage1", "stage2", "stage3"], ["joint", "stage3"])
        if not any(st == [s for s in seq if s in st] for seq in allowed):
            raise ValueError(f"inject.stages {st}: use a subsequence of stage1, stage2, stage3 in that order, or "
                             f"joint (optionally followed by stage3)")
        for name in STAGES:
            getattr(self, name).validate(name)
        if self.mmu_batch_size < 1 or self.t2i_batch_size < 1:
            raise ValueError("inject.mmu_batch_size and inject.t2i_batch_size must be >= 1")
        if self.amp not in ("none", "bfloat16"):
            raise ValueError(f"inject.amp must be 'none' or 'bfloat16', got {self.amp!r}")
        if self.stage3_data.num_images < 1 or not self.stage3_data.preview_steps:
            raise ValueError("inject.stage3_data: num_images >= 1 and at least one preview step")


@dataclass
class StagePlan:
    """Row groups and losses of one stage for one concept."""

    stage: str
    """Stage name."""
    trains: tuple[str, ...]
    """Row groups trained."""
    exists: tuple[str, ...]
    """Row groups that exist at this stage (active logit columns; saved)."""
    t2i_weight: float
    """Weight of the t2i loss (0 unless the generation tokens train)."""
    mmu_weight: float
    """Weight of the mmu loss."""


def stage_plan(stage: str, cfg: InjectStagesConfig, counts: dict[str, int]) -> StagePlan:
    """Which groups a stage trains, which exist at that stage (saved, active in the softmax) and its weights."""
    has = lambda *gs: tuple(g for g in gs if counts[g] > 0 or g == "concept")  # noqa: E731
    sc: StageConfig = getattr(cfg, stage)
    if stage == "stage1":
        trains = exists = has("concept", "understanding")
    elif stage == "stage2":
        trains = exists = has("concept", "understanding", "generation")
    elif stage == "stage3":
        trains, exists = ("stage3",), has(*GROUPS)
    else:
        trains = exists = has(*GROUPS)
    t2i = sc.t2i_weight if "generation" in trains else 0.0
    return StagePlan(stage, trains, exists, t2i, sc.mmu_weight)


class ConceptInjector:
    """Runs the injection stages of one concept on ``policy`` (model, tok, vq, concepts) in place."""

    def __init__(self, policy, dataset, concept: str, cfg: InjectStagesConfig, model_counts: tuple[int, int, int],
                 sampler_cfg: SamplerConfig | None = None, seed: int = 0,
                 face_embedder: Callable | None = None):
        """``model_counts``: (U, G, S) tokens per concept as built; ``face_embedder(images) -> [512] | None``."""
        self.policy, self.dataset, self.concept, self.cfg = policy, dataset, concept, cfg
        self.model, self.tok = policy.model, policy.tok
        self.ct: ConceptTokens = policy.concepts[concept]
        u, g, s = model_counts
        if len(self.ct.token_ids) != u + g + s:
            raise ValueError(f"concept {concept!r} has {len(self.ct.token_ids)} tokens, expected U+G+S={u + g + s}")
        self.counts = {"concept": 1, "understanding": u, "generation": g, "stage3": s}
        ids = self.ct.all_ids
        self.groups = {"concept": ids[:1], "understanding": ids[1:1 + u], "generation": ids[1 + u:1 + u + g],
                       "stage3": ids[1 + u + g:]}
        self.info = dataset.concept(concept).info
        self.sampler_cfg = sampler_cfg or SamplerConfig()
        self.seed, self.face_embedder = seed, face_embedder
        self.initialised = {"concept"}          # <c> got the class-word mean when the policy was built
        self.init_notes: dict[str, str] = {"concept": f"class-word mean ({self.info.class_word!r})"}
        self.codes: dict[str, torch.Tensor] = {}
        self.mmu_items, refs = D.understanding_items(dataset, concept)
        self.t2i_keys = sorted(D.t2i_image_refs(dataset, concept))
        self._encode(refs)
        self._encode(D.t2i_image_refs(dataset, concept), flips=cfg.random_flip)
        self.stage3_keys: list[str] = []
        self.step = 0

    # ------------------------------------------------------------------------------------------- data
    @torch.no_grad()
    def _encode(self, refs: dict, flips: bool = False, chunk: int = 16) -> None:
        """MAGVIT codes of ``refs`` into ``self.codes`` (and of their mirror images under ``key|flip``)."""
        keys = sorted(refs)
        for i in range(0, len(keys), chunk):
            ks = keys[i:i + chunk]
            imgs = [refs[k].load() for k in ks]
            codes = self.policy.vq.encode(imgs).cpu()
            for k, c in zip(ks, codes):
                self.codes[k] = c
            if flips:
                mirrored = self.policy.vq.encode([np.ascontiguousarray(im[:, ::-1]) for im in imgs]).cpu()
                for k, c in zip(ks, mirrored):
                    self.codes[k + "|flip"] = c

    def prompt_tokens(self, with_stage3: bool) -> ConceptPromptTokens:
        """Token strings by role; stage-3 tokens only when they exist at the stage."""
        u, g = self.counts["understanding"], self.counts["generation"]
        strs = self.ct.token_strs
        s3 = tuple(strs[u + g:]) if with_stage3 else ()
        return ConceptPromptTokens(self.ct.concept_str, tuple(strs[:u]), tuple(strs[u:u + g]), s3)

    def inactive(self, plan: StagePlan) -> torch.Tensor:
        """Logit columns masked in this stage: groups not existing yet and every other concept's rows."""
        cols = [i for g in GROUPS if g not in plan.exists for i in self.groups[g]]
        for name, ct in self.policy.concepts.items():
            if name != self.concept:
                cols += ct.all_ids
        return torch.tensor(sorted(cols), dtype=torch.long)

    def rows(self, groups) -> list[int]:
        """Row ids of ``groups`` in checkpoint order."""
        return [i for g in GROUPS if g in groups for i in self.groups[g]]

    # ------------------------------------------------------------------------------------------- init
    def init_groups(self, groups) -> None:
        """Initialise the not yet initialised ``groups`` (understanding before generation / stage 3)."""
        m = self.model
        for g in GROUPS:
            if g not in groups or g in self.initialised or not self.groups[g]:
                continue
            n = len(self.groups[g])
            if g == "understanding":
                codes = torch.stack([self.codes[f"train/{r.name}"] for r in
                                     self.dataset.concept(self.concept).train.images])
                rows = I.kmeans_token_init(m, self.tok.image_offset, codes, n, self.cfg.init.kmeans_seed, self.concept)
                note = f"k-means (k={n}, seed {self.cfg.init.kmeans_seed}) of {codes.numel()} image-token rows"
            else:
                self.init_groups(("understanding",))
                und = I.read_rows(m, self.groups["understanding"])
                seed = sample_seed(self.seed, 0, GROUPS.index(g), 0, 0, f"inject/init/{self.concept}")
                rows = I.derived_token_init(und, n, self.cfg.init.noise_scale, seed)
                note = f"understanding mean + {self.cfg.init.noise_scale}·std noise"
                if g == "generation" and self.face_embedder is not None and self.info.category == "human":
                    face = self.face_embedder([r.load() for r in self.dataset.concept(self.concept).train.images])
                    if face is None:
                        log.warning("concept %r: no face found in its training images; generation tokens use the "
                                    "fallback init", self.concept)
                        note += " (no face found)"
                    else:
                        rows = I.face_token_init(face, n, m.config.hidden_size, rows,
                                                 target_norm=float(und.embed.norm(dim=1).mean()))
                        note = "FaceNet mean embedding, [n,512/n] interpolated to hidden, rescaled"
            I.write_rows(m, self.groups[g], rows)
            self.initialised.add(g)
            self.init_notes[g] = note

    # ------------------------------------------------------------------------------------------- stage 3 data
    @torch.no_grad()
    def make_stage3_data(self) -> dict[str, float]:
        """Generate, diff and register the stage-3 items (see module doc). Returns the changed fractions."""
        c3 = self.cfg.stage3_data
        gens = [make_generator(sample_seed(self.seed, 0, 0, i, 0, f"inject/stage3/{self.concept}"),
                               device=self.model.device) for i in range(c3.num_images)]
        prompt = f"A photo of {self.prompt_tokens(False).t2i_phrase()}."
        grids, frac = D.stage3_diff_codes(self.model, self.tok, self.policy.vq.num_tokens, self.sampler_cfg, prompt,
                                          gens, c3, self.codes[D.BLACK], self.cfg.max_text_len)
        self.codes.update(grids)
        self.stage3_keys = list(grids)
        return frac

    # ------------------------------------------------------------------------------------------- training
    def stage_items(self, plan: StagePlan) -> list[D.MMUItem]:
        """The stage's understanding items."""
        items = list(self.mmu_items)
        if plan.stage == "stage3":
            items += D.stage3_items(self.ct.concept_str, self.info.info, self.stage3_keys)
        return items

    def _order(self, n: int, stage: str, stream: str, epoch: int) -> list[int]:
        return D.shuffled(n, sample_seed(self.seed, epoch, STAGES.index(stage), 0, 0,
                                         f"inject/{stream}/{self.concept}"))

    def _autocast(self):
        if self.cfg.amp == "bfloat16" and self.model.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def batch_loss(self, plan: StagePlan, mmu_items, t2i_keys, gen: torch.Generator | None,
                   inactive: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted loss of one step (mmu items and/or t2i image keys) and its parts."""
        total = torch.zeros((), device=self.model.device)
        parts: dict[str, float] = {}
        pt = self.prompt_tokens("stage3" in plan.exists)
        with self._autocast():
            if plan.mmu_weight > 0 and mmu_items:
                b = D.build_mmu_batch(self.tok, mmu_items, self.codes, pt.mmu_prefix())
                loss, _ = D.mmu_loss(self.model, b, inactive)
                total = total + plan.mmu_weight * loss
                parts["mmu"] = float(loss.detach())
            if plan.t2i_weight > 0 and t2i_keys:
                grids = torch.stack([self.codes[k] for k in t2i_keys])
                b = D.build_t2i_batch(self.tok, [f"A photo of {pt.t2i_phrase()}."] * len(t2i_keys), grids,
                                      gen, self.cfg.max_text_len)
                loss, _ = D.t2i_loss(self.model, b, inactive)
                total = total + plan.t2i_weight * loss
                parts["t2i"] = float(loss.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def begin_stage(self, stage: str) -> StagePlan:
        """Initialise the stage's groups, build its data and optimizer; returns its plan."""
        plan = stage_plan(stage, self.cfg, self.counts)
        self.init_groups(plan.trains)
        self.plan, self.sc = plan, getattr(self.cfg, stage)
        self.extra: dict[str, float] = {}
        if stage == "stage3":
            self.extra = self.make_stage3_data()
        self.items = self.stage_items(plan)
        self._inactive = self.inactive(plan)
        self.restriction = restrict_grads_to_rows(self.model, self.rows(plan.trains))
        self.opt = RowDecayAdamW(self.restriction, lr=self.sc.lr, weight_decay=self.sc.weight_decay,
                                 eps=self.sc.eps, betas=tuple(self.sc.betas))
        self.epoch = 0
        return plan

    def _batches(self, stage: str, epoch: int) -> list[tuple[list, list]]:
        plan, cfg = self.plan, self.cfg
        mmu = [self.items[i] for i in self._order(len(self.items), stage, "mmu", epoch)]
        if plan.t2i_weight == 0:
            bs = cfg.mmu_batch_size
            return [(mmu[i:i + bs], []) for i in range(0, len(mmu), bs)]
        flip_rng = np.random.default_rng(sample_seed(self.seed, epoch, STAGES.index(stage), 0, 0,
                                                     f"inject/flip/{self.concept}"))
        keys = [self.t2i_keys[i] for i in self._order(len(self.t2i_keys), stage, "t2i", epoch)]
        if cfg.random_flip:
            keys = [k + "|flip" if flip_rng.random() < 0.5 else k for k in keys]
        bs, mbs = cfg.t2i_batch_size, cfg.mmu_batch_size
        steps = math.ceil(len(keys) / bs)
        stream = mmu * math.ceil(steps * mbs / max(len(mmu), 1))  # cycle this epoch's mmu order
        return [(stream[i * mbs:(i + 1) * mbs] if plan.mmu_weight > 0 else [], keys[i * bs:(i + 1) * bs])
                for i in range(steps)]

    def run_epoch(self) -> list[dict]:
        """One epoch of the current stage; returns one metrics record per optimizer step."""
        stage = self.plan.stage
        self.epoch += 1
        self.model.train()
        records = []
        for j, (mmu, t2i) in enumerate(self._batches(stage, self.epoch)):
            t0 = time.perf_counter()
            gen = make_generator(sample_seed(self.seed, self.epoch, STAGES.index(stage), j, 0,
                                             f"inject/mask/{self.concept}"))
            self.opt.zero_grad(set_to_none=True)
            loss, parts = self.batch_loss(self.plan, mmu, t2i, gen, self._inactive)
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(f"concept {self.concept!r} {stage} epoch {self.epoch}: loss is {loss}")
            loss.backward()
            self.opt.step()
            self.step += 1
            records.append({"step": self.step, "concept": self.concept, "stage": stage, "epoch": self.epoch,
                            **{f"{self.concept}/{stage}/{k}": v for k, v in parts.items()},
                            f"{self.concept}/{stage}/step_s": time.perf_counter() - t0})
        return records

    @torch.no_grad()
    def eval_loss(self, stage: str | None = None) -> dict[str, float]:
        """The stage's loss parts (unweighted means over its batches; fixed masking seed; eval mode)."""
        plan = stage_plan(stage, self.cfg, self.counts) if stage else self.plan
        inactive, items, was = self.inactive(plan), self.stage_items(plan), self.model.training
        self.model.eval()
        mmu_only, t2i_only = replace(plan, t2i_weight=0.0, mmu_weight=1.0), replace(plan, t2i_weight=1.0,
                                                                                    mmu_weight=0.0)
        bs, tbs = self.cfg.mmu_batch_size, self.cfg.t2i_batch_size
        gen = make_generator(sample_seed(self.seed, 0, 0, 0, 0, f"inject/eval/{self.concept}"))
        out = {"mmu": [self.batch_loss(mmu_only, items[i:i + bs], [], None, inactive)[1]["mmu"]
                       for i in range(0, len(items), bs)]}
        if plan.t2i_weight > 0:
            out["t2i"] = [self.batch_loss(t2i_only, [], self.t2i_keys[i:i + tbs], gen, inactive)[1]["t2i"]
                          for i in range(0, len(self.t2i_keys), tbs)]
        self.model.train(was)
        return {k: float(np.mean(v)) for k, v in out.items()}

    def save(self, out_dir: str | os.PathLike, epoch: int | None = None) -> dict[str, Path]:
        """UniCTokens checkpoint of the rows that exist at this stage: ``<out_dir>/epoch_N_*.pt``."""
        n = len(self.rows(self.plan.exists))
        sub = ConceptTokens(self.ct.name, self.ct.concept_id, self.ct.token_ids[:n - 1], self.ct.concept_str,
                            self.ct.token_strs[:n - 1])
        assert sub.all_ids == self.rows(self.plan.exists)
        return save_concept_checkpoint(self.model, sub, out_dir, self.epoch if epoch is None else epoch)

    def end_stage(self) -> None:
        """Remove the gradient hooks and drop the optimizer."""
        self.restriction.remove()
        self.opt = None
