"""The learner's per-rank replay + loss logic (no Ray; the DeepSpeed engine comes in as callables).

- A *replay unit* is one (sample, MaskGIT step t) or one (sample, answer); the answer unit exists when the sample
  has answer tokens and ``alpha_und > 0``.
- :func:`schedule_units` (D12) deals image units and answer units round-robin *per kind*, each kind padded to a
  multiple of the world size with zero-weight copies: every rank runs the same number of forward/backward calls
  and, at each position, the same kind (ZeRO-2 reduces inside each backward, so hook order must match).
- A unit's loss is its exact share of the D5 step loss (``rl.grpo.objective`` holds the 1/S mean and the T·N / L_text
  normalisers); summed over all units of all ranks it is the step loss.
- ``learner.units_per_forward`` = k packs up to k consecutive image units of a rank into one forward/backward
  (:mod:`actors.learner.pack`; same packs on every rank, so the D12 alignment holds).
- :func:`run_units` multiplies each unit loss by ``weight × world_size``: DeepSpeed *averages* over ranks, so
  mean_r(Σ_{u∈r} W·∇ℓ_u) = Σ_u ∇ℓ_u, the single-process gradient of the step loss (tests/test_learner.py).

Old log-probs (:func:`old_logp_source`): on-policy runs use the learner's own detached log-probs (D4, μ = 1) and the
rollout's recorded log-probs only feed the rollout–learner mismatch metric; with ``run.overlap: one_step`` the
samples come from the weights one update back, so the ratio's old log-probs are the rollout's recorded (behaviour)
log-probs and the mismatch metric shows the policy lag.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["old_logp_source", "ReplayUnit", "build_units", "schedule_units", "UnitStats", "run_units", "ReplayBackend", "UnitForward",
           "ShowoBackend", "make_showo_backend", "concept_specs", "ToyBackend"]

_STAT_KEYS = ("loss", "tokens", "kl_sum", "clip_sum", "image_absdiff", "image_tokens", "answer_absdiff",
              "answer_tokens", "units")


OLD_LOGP_SOURCES = ("learner", "rollout")


def old_logp_source(cfg: Any) -> str:
    """Where the PPO ratio's old log-probs come from: "learner" (D4: its own detached log-probs, on-policy runs) or
    "rollout" (the behaviour policy's recorded log-probs, when ``run.overlap`` makes the samples one update old)."""
    overlap = getattr(getattr(cfg, "run", None), "overlap", "none")
    return "learner" if overlap == "none" else "rollout"


def _old(source: str, rollout: torch.Tensor) -> torch.Tensor | None:
    """The old log-probs argument of rl.grpo.objective: None (= the learner's detached log-probs) or the rollout's."""
    if source not in OLD_LOGP_SOURCES:
        raise ValueError(f"old log-prob source must be one of {OLD_LOGP_SOURCES}, got {source!r}")
    return rollout if source == "rollout" else None


@dataclass(frozen=True)
class ReplayUnit:
    """One forward/backward of the learner: MaskGIT step ``step`` of sample ``sample``, or its answer."""

    sample: int
    """Index into the step's (id-sorted) sample list."""
    kind: str
    """Unit kind: image (one MaskGIT step) or answer (the IR tokens)."""
    step: int = 0
    """MaskGIT step t for image units (0 for answers)."""
    weight: float = 1.0
    """1 for real units, 0 for padding units (same compute, no contribution)."""


def build_units(samples: Sequence[Any], alpha_und: float) -> tuple[list[ReplayUnit], list[ReplayUnit]]:
    """(image units, answer units) in id order: T per sample, plus one answer unit when it has tokens and α_und>0."""
    image = [ReplayUnit(i, "image", t) for i, s in enumerate(samples) for t in range(int(s.states.shape[0]))]
    answer = [ReplayUnit(i, "answer") for i, s in enumerate(samples) if alpha_und > 0 and len(s.answer_ids) > 0]
    return image, answer


def _deal(units: list[ReplayUnit], world_size: int) -> list[list[ReplayUnit]]:
    """Round-robin ``units`` over ranks, padded with zero-weight copies of the first unit to equal lengths."""
    if not units:
        return [[] for _ in range(world_size)]
    per_rank = -(-len(units) // world_size)
    pad = ReplayUnit(units[0].sample, units[0].kind, units[0].step, 0.0)
    padded = units + [pad] * (per_rank * world_size - len(units))
    return [padded[r::world_size] for r in range(world_size)]


def schedule_units(samples: Sequence[Any], world_size: int, alpha_und: float) -> list[list[ReplayUnit]]:
    """Per-rank unit lists (D12): equal lengths, and unit k is of the same kind on every rank."""
    if world_size < 1:
        raise ValueError(f"schedule_units: world_size must be >= 1, got {world_size}")
    image, answer = build_units(samples, alpha_und)
    img, ans = _deal(image, world_size), _deal(answer, world_size)
    return [img[r] + ans[r] for r in range(world_size)]


@dataclass
class UnitStats:
    """Sums a rank reports; the group adds them over ranks (so means are token-weighted over the whole step)."""

    loss: float = 0.0
    """Σ unit losses (unscaled): over all ranks this is the D5 step loss."""
    tokens: float = 0.0
    """Tokens behind kl_sum / clip_sum."""
    kl_sum: float = 0.0
    """Σ per-token k3 KL to the reference."""
    clip_sum: float = 0.0
    """Σ clipped-token indicators."""
    image_absdiff: float = 0.0
    """Σ |rollout logp − learner logp| over image positions (D4 mismatch)."""
    image_tokens: float = 0.0
    """Positions behind image_absdiff."""
    answer_absdiff: float = 0.0
    """Σ |rollout logp − learner logp| over answer tokens."""
    answer_tokens: float = 0.0
    """Tokens behind answer_absdiff."""
    units: float = 0.0
    """Real (non-padding) units run."""

    def add(self, other: dict[str, float]) -> None:
        """Accumulate another stats dict."""
        for k in _STAT_KEYS:
            setattr(self, k, getattr(self, k) + float(other.get(k, 0.0)))

    def as_dict(self) -> dict[str, float]:
        """Plain dict of the sums."""
        return {k: getattr(self, k) for k in _STAT_KEYS}


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Turn summed rank stats into step metrics (loss, kl, clip_frac, log-prob mismatch)."""
    return {
        "loss": sums["loss"],
        "kl": sums["kl_sum"] / max(sums["tokens"], 1.0),
        "clip_frac": sums["clip_sum"] / max(sums["tokens"], 1.0),
        "logp_mismatch_image": sums["image_absdiff"] / max(sums["image_tokens"], 1.0),
        "logp_mismatch_answer": sums["answer_absdiff"] / max(sums["answer_tokens"], 1.0),
        "units": sums["units"],
    }


class ReplayBackend(Protocol):
    """What a learner rank trains: the module, and the loss of one replay unit."""

    module: nn.Module
    """The trainable module (DeepSpeed wraps it)."""
    row_ids: list[int] | None
    """D1 ``concept_rows``: the rows that train and travel in sync; None = all weights."""
    row_params: tuple[str, ...]
    """Parameter names whose dim-0 rows ``row_ids`` index (embedding, lm_head)."""

    def unit_loss(self, module: nn.Module, samples: Sequence[Any], unit: ReplayUnit,
                  num_samples: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of ``unit`` (its D5 contribution, with grad) and its stats sums (see :class:`UnitStats`)."""
        ...


class UnitForward(nn.Module):
    """What DeepSpeed wraps: ``forward(fn) = fn(inner)``, so one unit's whole loss is ONE engine forward.

    DeepSpeed hangs its backward prologue (ZeRO / BF16 optimizer bookkeeping: clearing low-precision grads,
    boundary flags) on the outputs of ``engine.forward``; calling the inner module directly would skip it (with
    bf16 + ZeRO-1 the fp32 accumulation then double counts). Parameter names gain the prefix ``inner.``."""

    def __init__(self, inner: nn.Module):
        """Wrap the policy module ``inner``."""
        super().__init__()
        self.inner = inner

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        """Run ``fn(inner)`` (a unit's forward + loss)."""
        return fn(self.inner)


def run_units(module: nn.Module, backward: Callable[[torch.Tensor], Any], backend: ReplayBackend,
              samples: Sequence[Any], units: Sequence[ReplayUnit], world_size: int,
              forward: Callable[[Callable], Any] | None = None, units_per_forward: int = 1) -> dict[str, float]:
    """Forward + ``backward(loss · world_size)`` per pack of units; returns this rank's stats sums.

    A pack (:func:`actors.learner.pack.pack_units`) is one unit, or up to ``units_per_forward`` image units in one
    batched forward whose loss is Σ weight·unit loss. ``forward(fn)`` runs ``fn(module)`` (the DeepSpeed engine
    around :class:`UnitForward`; default: a plain call); ``backward`` is ``engine.backward(loss,
    scale_wrt_gas=False)``, called once per pack. Padding units (weight 0) run the same compute.
    """
    from actors.learner.pack import pack_loss, pack_units

    forward = forward or (lambda fn: fn(module))
    stats = UnitStats()
    for pack in pack_units(units, units_per_forward):
        loss, sts = forward(lambda m, pack=pack: pack_loss(backend, m, samples, pack, len(samples)))
        backward(loss * world_size)
        for st in sts:
            stats.add(st)
            stats.units += 1
    return stats.as_dict()


# ---------------------------------------------------------------------------------------------------------------
# Show-o backend


def _t(x: Any) -> torch.Tensor:
    """A writable torch copy of a (possibly read-only, object-store backed) numpy array."""
    return torch.from_numpy(np.array(x, copy=True))


def _objective_stats(loss: torch.Tensor, st: dict[str, torch.Tensor]) -> dict[str, float]:
    """rl.grpo.objective stats (means) → sums."""
    n = float(st["tokens"])
    return {"loss": float(loss.detach()), "tokens": n, "kl_sum": float(st["kl_mean"]) * n,
            "clip_sum": float(st["clip_frac"]) * n}


class ShowoBackend:
    """Replays RolloutSamples through Show-o (backbone.replay) with the Dr.GRPO loss (rl.grpo.objective).

    Holds the policy (``Policy`` from ``backbone.build``) and a frozen reference copy made at construction
    (same weights: the initial policy). Per-sample T2I batches / MMU inputs are cached for the step's T units.
    """

    def __init__(self, policy: Any, objective: Any, guidance_scale: float, answer_temperature: float = 1.0,
                 answer_top_k: int | None = None, trainable: str = "all", old_logp: str = "learner"):
        """``policy``: backbone Policy; ``objective``: ObjectiveConfig; the answer sampling params define D3;
        ``old_logp``: "learner" or "rollout" (:func:`old_logp_source`)."""
        _old(old_logp, None)
        self.old_logp = old_logp
        self.policy = policy
        self.module = policy.model
        self.tok = policy.tok
        self.objective = objective
        self.guidance_scale = float(guidance_scale)
        self.answer_temperature = float(answer_temperature)
        self.answer_top_k = answer_top_k
        self.reference = None
        if objective.kl_beta > 0:
            self.reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.row_params: tuple[str, ...] = ()
        self.row_ids: list[int] | None = None
        self.restriction = None
        if trainable == "concept_rows":
            from backbone.concepts import restrict_grads_to_rows

            ids = sorted({int(i) for c in policy.concepts.values() for i in c.all_ids})
            self.restriction = restrict_grads_to_rows(policy.model, ids)  # after the reference copy (no hooks there)
            self.row_ids = ids
            self.row_params = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")
        elif trainable != "all":
            raise ValueError(f"learner.trainable must be 'all' or 'concept_rows', got {trainable!r}")
        self._cache: dict[tuple[int, int, str], Any] = {}

    def begin_step(self) -> None:
        """Drop per-sample caches (call once per train step)."""
        self._cache.clear()

    def export(self, module: nn.Module, path: str) -> str:
        """Final weights: Show-o safetensors (``path/pytorch_model.safetensors``) + UniCTokens concept rows
        (``path/concepts/<name>/epoch_0_*.pt``). Returns ``path``."""
        import os

        from backbone.checkpoint import save_showo_state_dict
        from backbone.concepts import save_concept_checkpoint

        os.makedirs(path, exist_ok=True)
        save_showo_state_dict(module, path)
        for name, ct in self.policy.concepts.items():
            save_concept_checkpoint(module, ct, os.path.join(path, "concepts", name), epoch=0)
        return path

    def _t2i(self, samples: Sequence[Any], i: int, device: torch.device):
        """Cached T2IBatch of sample i (cond + uncond, masks)."""
        key = (id(samples), i, "t2i")
        if key not in self._cache:
            from backbone.prompts import T2IInputs
            from backbone.replay import as_t2i_batch

            s = samples[i]
            n = int(s.states.shape[1])
            ids = _t(s.t2i_input_ids)[None]
            un = _t(s.uncond_input_ids)[None]
            t2i = T2IInputs(input_ids=ids, uncond_input_ids=un, text_len=int(ids.shape[1]) - n - 2,
                            num_image_tokens=n, truncated=[bool(s.prompt_cut)])
            self._cache[key] = as_t2i_batch(self.tok, t2i, self.guidance_scale, device=device)
        return self._cache[key]

    def _mmu(self, samples: Sequence[Any], i: int, device: torch.device):
        """MMUInputs of sample i (one unpadded prompt)."""
        from backbone.prompts import MMUInputs, mmu_attention_mask

        s = samples[i]
        ids = _t(s.mmu_input_ids)[None].to(device)
        n = int(s.states.shape[1])
        return MMUInputs(input_ids=ids, attention_mask=mmu_attention_mask(ids, self.tok),
                         prompt_lens=[int(ids.shape[1])], prefix_len=n + 3)

    def unit_loss(self, module: nn.Module, samples: Sequence[Any], unit: ReplayUnit,
                  num_samples: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The D5 contribution of one unit, with gradient through ``module``."""
        from rl.grpo.objective import answer_loss

        s = samples[unit.sample]
        dev = next(module.parameters()).device
        cfg = self.objective
        if unit.kind == "image":
            from backbone.replay import image_step_logprobs

            batch = self._t2i(samples, unit.sample, dev)
            state = _t(s.states[unit.step])[None]
            chosen = _t(s.chosen[unit.step])[None]
            logp = image_step_logprobs(module, self.tok, batch, state, chosen, self.guidance_scale)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = image_step_logprobs(self.reference, self.tok, batch, state, chosen, self.guidance_scale)
            return self._image_row_loss(s, unit.step, logp, ref, num_samples)
        if unit.kind == "answer":
            from backbone.replay import answer_logprobs, answer_mask

            mmu = self._mmu(samples, unit.sample, dev)
            ans = _t(s.answer_ids)[None].to(dev)
            kw = dict(temperature=self.answer_temperature, top_k=self.answer_top_k)
            logp = answer_logprobs(module, self.tok, mmu, ans, **kw)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = answer_logprobs(self.reference, self.tok, mmu, ans, **kw)
            mask = answer_mask(ans, self.tok.eot_id)
            rollout = _t(s.answer_logps).to(dev)[None]
            loss, st = answer_loss(logp, _old(self.old_logp, rollout), ref, mask, [float(s.advantage)], num_samples,
                                   cfg)
            out = _objective_stats(loss, st)
            w = mask.to(logp.dtype)
            out["answer_absdiff"] = float(((logp.detach() - rollout).abs() * w).sum())
            out["answer_tokens"] = float(w.sum())
            return loss, out
        raise ValueError(f"ReplayUnit.kind must be 'image' or 'answer', got {unit.kind!r}")

    def pack_loss(self, module: nn.Module, samples: Sequence[Any], pack: Sequence[ReplayUnit],
                  num_samples: int) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Several image units in one batched CFG forward (policy, then the frozen reference), then each unit's D5
        contribution from its own row (the terms of :meth:`unit_loss`); returns (Σ weight·loss, real units' stats).
        See :mod:`actors.learner.pack`."""
        from actors.learner.pack import sequential_loss, stack_t2i
        from backbone.replay import image_step_logprobs

        dev = next(module.parameters()).device
        batch = stack_t2i([self._t2i(samples, u.sample, dev) for u in pack])
        if batch is None or any(u.kind != "image" for u in pack):   # unequal sequence lengths: unit by unit
            return sequential_loss(self, module, samples, pack, num_samples)
        state = torch.stack([_t(samples[u.sample].states[u.step]) for u in pack])
        chosen = torch.stack([_t(samples[u.sample].chosen[u.step]) for u in pack])
        logp = image_step_logprobs(module, self.tok, batch, state, chosen, self.guidance_scale)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = image_step_logprobs(self.reference, self.tok, batch, state, chosen, self.guidance_scale)
        total, stats = None, []
        for j, u in enumerate(pack):
            loss, out = self._image_row_loss(samples[u.sample], u.step, logp[j:j + 1],
                                             None if ref is None else ref[j:j + 1], num_samples)
            total = loss * float(u.weight) if total is None else total + loss * float(u.weight)
            if u.weight > 0:
                stats.append(out)
        return total, stats

    def _image_row_loss(self, s: Any, step: int, logp: torch.Tensor, ref: torch.Tensor | None,
                        num_samples: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The D5 contribution of MaskGIT step ``step`` of sample ``s`` from its log-prob row ``logp`` [1, N]
        (``ref``: the frozen reference's row), and its stats sums (mismatch to the rollout included)."""
        from rl.grpo.objective import image_step_loss, newly_unmasked_positions

        cfg = self.objective
        T, N = (int(x) for x in s.states.shape)
        mask = None
        if cfg.image_positions == "newly_unmasked":
            mask = newly_unmasked_positions(_t(s.states), self.tok.mask_id)[step][None].to(logp.device)
        rollout = _t(s.image_logps[step]).to(logp.device)[None]
        loss, st = image_step_loss(logp, _old(self.old_logp, rollout), ref, [float(s.advantage)], T, N, num_samples,
                                   cfg, mask)
        out = _objective_stats(loss, st)
        w = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
        out["image_absdiff"] = float(((logp.detach() - rollout).abs() * w).sum())
        out["image_tokens"] = float(w.sum())
        return loss, out


def concept_specs(dataset: Any) -> list:
    """ConceptSpec list of a ConceptDataset (name + class word)."""
    from backbone.build import ConceptSpec

    return [ConceptSpec(c.info.name, c.info.class_word) for c in dataset.concepts.values()]


def make_showo_backend(cfg: Any, device: torch.device, concepts: list | None = None) -> ShowoBackend:
    """Default backend factory: the policy from a TrainConfig (same cfg + seed → same init on every rank).

    ``concepts``: ConceptSpec list; None = read them from ``cfg.data`` (the concept dataset)."""
    from backbone.build import build_policy

    if concepts is None:
        from rl.data.reader import load_dataset

        concepts = concept_specs(load_dataset(cfg.data))
    policy = build_policy(cfg.model, concepts, device=device)
    return ShowoBackend(policy, cfg.objective, cfg.sampler.guidance_scale,
                        answer_temperature=cfg.rollout.answer_temperature, answer_top_k=cfg.rollout.answer_top_k,
                        trainable=cfg.learner.trainable, old_logp=old_logp_source(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Toy backend: a few-hundred-parameter stand-in with the same unit/loss wiring, for CPU tests and benchmarks of the
# Ray / DeepSpeed / sync mechanics. Image units use ``embed`` + ``img``; answer units ``embed`` + ``txt``.


class ToyBackend:
    """Tiny policy over RolloutSamples: image logits = img(embed(state ids)), answer logits = txt(embed(prev))."""

    def __init__(self, objective: Any, vocab: int = 32, codebook: int = 16, hidden: int = 8, seed: int = 0,
                 row_ids: list[int] | None = None, old_logp: str = "learner"):
        """Same ``seed`` → same weights in every process. ``row_ids`` → concept_rows-style sync of embed rows;
        ``old_logp``: "learner" or "rollout" (:func:`old_logp_source`)."""
        _old(old_logp, None)
        self.old_logp = old_logp
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.module = nn.ModuleDict({"embed": nn.Embedding(vocab, hidden), "img": nn.Linear(hidden, codebook),
                                     "txt": nn.Linear(hidden, vocab)})
        torch.random.set_rng_state(gen_state)
        self.reference = copy.deepcopy(self.module).requires_grad_(False)
        self.objective = objective
        self.row_ids = row_ids
        self.row_params: tuple[str, ...] = ("embed.weight",) if row_ids is not None else ()

    @classmethod
    def factory(cls, cfg: Any, device: torch.device, **kw) -> "ToyBackend":
        """backend_factory signature: ``functools.partial(ToyBackend.factory, seed=...)``."""
        return cls(cfg.objective, **{"old_logp": old_logp_source(cfg), **kw})

    @staticmethod
    def image_logp(m: nn.Module, states: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """log-probs of ``chosen`` codes given state ids (any leading shape)."""
        return torch.log_softmax(m["img"](m["embed"](states)), -1).gather(-1, chosen[..., None])[..., 0]

    @staticmethod
    def answer_logp(m: nn.Module, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """log-probs [M] of ``answer`` tokens, each given the previous token."""
        prev = torch.cat([prompt[-1:], answer[:-1]])
        return torch.log_softmax(m["txt"](m["embed"](prev)), -1).gather(-1, answer[:, None])[:, 0]

    def unit_loss(self, module: nn.Module, samples: Sequence[Any], unit: ReplayUnit,
                  num_samples: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The unit's D5 contribution via rl.grpo.objective (same call pattern as ShowoBackend)."""
        from rl.grpo.objective import answer_loss, image_step_loss

        s = samples[unit.sample]
        if unit.kind == "image":
            T, N = (int(x) for x in s.states.shape)
            st_, ch = torch.tensor(s.states[unit.step]), torch.tensor(s.chosen[unit.step])
            logp = self.image_logp(module, st_, ch)[None]
            with torch.no_grad():
                ref = self.image_logp(self.reference, st_, ch)[None]
            rollout = _t(s.image_logps[unit.step])[None]
            loss, st = image_step_loss(logp, _old(self.old_logp, rollout), ref, [float(s.advantage)], T, N,
                                       num_samples, self.objective)
            out = _objective_stats(loss, st)
            out["image_absdiff"] = float((logp.detach() - rollout).abs().sum())
            out["image_tokens"] = float(N)
            return loss, out
        prompt, ans = torch.tensor(s.mmu_input_ids), torch.tensor(s.answer_ids)
        logp = self.answer_logp(module, prompt, ans)[None]
        with torch.no_grad():
            ref = self.answer_logp(self.reference, prompt, ans)[None]
        mask = torch.ones_like(logp, dtype=torch.bool)
        rollout = _t(s.answer_logps)[None]
        loss, st = answer_loss(logp, _old(self.old_logp, rollout), ref, mask, [float(s.advantage)], num_samples,
                               self.objective)
        out = _objective_stats(loss, st)
        out["answer_absdiff"] = float((logp.detach() - rollout).abs().sum())
        out["answer_tokens"] = float(ans.shape[0])
        return loss, out
