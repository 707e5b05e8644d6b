"""Show-o's MaskGIT sampler (t2i), with trajectory recording, pause/resume and per-sample generators.

Exactly Show-o's ``t2i_generate`` loop (research notes §A7), per step ``k = 0..T-1``:

1. CFG logits ``(1+s)·cond − s·uncond`` over the code columns only (``image_offset .. image_offset+K``), both
   branches in one forward of ``2B`` rows (cond rows first). No next-token shift.
2. ``sampled ~ multinomial(softmax(logits))`` at temperature 1 at every position; ``chosen = where(unknown,
   sampled, current code)``.
3. ``mask_len = floor(N·cos(π/2·(k+1)/T))`` (fp32, as Show-o), clamped to ``max(1, min(#unknown − 1, mask_len))``.
4. ``τ ← τ·(1 − (k+1)/T)`` (compounding: the variable is reassigned every step).
5. ``confidence = log(clamp(p(chosen), 1e-20)) + τ·Gumbel`` (``+inf`` at known positions);
   re-mask where ``confidence < sort(confidence)[mask_len]``.

The returned grid is the last step's ``chosen`` (every position filled).

Speed: the 129-token text prefix never attends to image tokens, so its K/V are computed once per sample (cond and
uncond) and reused; each step runs only the image block ``[soi, N image ids, eoi]`` with ``past_key_values`` and the
image-block rows of the omni-attention mask (prefix columns except pads), positions continuing from the prefix
length, and only the code rows of ``lm_head`` at the N image positions.

Randomness (design D7): sample ``b`` draws only from ``generators[b]`` (its multinomial row, then its Gumbel
uniforms), so its result does not depend on the other samples in the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from backbone.config import SamplerConfig
from backbone.phi import KV

NEG_LOG_EPS = 1e-20


# --------------------------------------------------------------------------------------------- schedule math
def mask_ratio(step: int, timesteps: int, schedule: str = "cosine") -> torch.Tensor:
    """Show-o's ``noise_schedule(torch.tensor((k+1)/T))`` as an fp32 scalar tensor."""
    if schedule != "cosine":
        raise ValueError(f"SamplerConfig.schedule: unknown schedule {schedule!r} (only 'cosine')")
    ratio = torch.tensor(1.0 * (step + 1) / timesteps)
    return torch.cos(ratio * math.pi * 0.5)


def schedule_mask_len(step: int, timesteps: int, num_tokens: int, num_unknown: torch.Tensor,
                      schedule: str = "cosine") -> torch.Tensor:
    """Positions left masked after step ``step``: ``max(1, min(unknown − 1, floor(N·ratio)))``; long, shape of
    ``num_unknown``."""
    mask_len = (num_tokens * mask_ratio(step, timesteps, schedule)).floor().to(torch.long)
    mask_len = torch.minimum(num_unknown.to(torch.long) - 1, mask_len.to(num_unknown.device))
    return mask_len.clamp(min=1)


def next_temperature(tau: float, step: int, timesteps: int) -> float:
    """Show-o's compounding Gumbel temperature: ``τ·(1 − (k+1)/T)`` (python float, as in Show-o)."""
    return tau * (1.0 - 1.0 * (step + 1) / timesteps)


def schedule_table(timesteps: int, num_tokens: int, tau0: float = 1.0) -> list[tuple[int, float]]:
    """(still masked, τ) after each step, assuming no confidence ties (pure function, for docs and tests)."""
    unknown, tau, out = torch.tensor(num_tokens), tau0, []
    for k in range(timesteps):
        unknown = schedule_mask_len(k, timesteps, num_tokens, unknown)
        tau = next_temperature(tau, k, timesteps)
        out.append((int(unknown), tau))
    return out


def gumbel_noise(n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """``-log(-log(U))`` with Show-o's 1e-20 clamps; ``U`` drawn as ``zeros(n).uniform_(0, 1, generator)``."""
    u = torch.zeros(n, device=device).uniform_(0, 1, generator=generator)
    return -torch.log((-torch.log(u.clamp(min=NEG_LOG_EPS))).clamp(min=NEG_LOG_EPS))


def mask_by_random_topk(mask_len: torch.Tensor, log_conf: torch.Tensor, known: torch.Tensor, tau: float,
                        generators: list[torch.Generator | None]) -> torch.Tensor:
    """Show-o's re-mask rule per sample row.

    log_conf ``[B,N]`` = log p(chosen) (clamped at log 1e-20); known ``[B,N]`` bool gets ``+inf`` confidence;
    ``confidence = log_conf + τ·Gumbel`` with row ``b``'s uniforms from ``generators[b]``; returns the bool
    ``[B,N]`` of positions to re-mask (``confidence < sort(confidence)[mask_len]``)."""
    b, n = log_conf.shape
    noise = torch.stack([gumbel_noise(n, generators[i], log_conf.device) for i in range(b)])
    confidence = log_conf + tau * noise
    confidence = torch.where(known, torch.full_like(confidence, math.inf), confidence)
    cut = torch.sort(confidence, dim=-1).values.gather(1, mask_len.view(b, 1).long())
    return confidence < cut


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per position; sample ``b`` ([N,K] rows) uses only ``generators[b]``. -> long [B,N]."""
    return torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[:, 0]
                        for i in range(probs.shape[0])])


@dataclass
class StepResult:
    """One MaskGIT step's outputs on plain logits."""

    next_ids: torch.Tensor
    """long [B,N] image-block input ids after the step (mask id or offset code ids)."""
    chosen: torch.Tensor
    """long [B,N] code ids: where(unknown, sampled, current code) (the predicted full grid)."""
    logps: torch.Tensor
    """float32 [B,N] log_softmax(CFG logits).gather(chosen) at every position (design D4)."""
    tau: float
    """Gumbel temperature after this step (the one used in this step's confidence)."""


def maskgit_step(logits: torch.Tensor, current_ids: torch.Tensor, step: int, timesteps: int, tau: float,
                 generators: list[torch.Generator | None], mask_id: int, image_offset: int,
                 schedule: str = "cosine") -> StepResult:
    """Show-o's MaskGIT update from CFG code logits ``[B,N,K]`` (fp32) and the current image ids ``[B,N]``."""
    logits = logits.float()
    b, n, _ = logits.shape
    probs = logits.softmax(dim=-1)
    sampled = sample_rows(probs, generators)
    unknown = current_ids == mask_id
    current_codes = torch.where(unknown, torch.zeros_like(current_ids), current_ids - image_offset)
    chosen = torch.where(unknown, sampled, current_codes)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, chosen[..., None])[..., 0]
    log_conf = torch.log(probs.gather(-1, chosen[..., None])[..., 0].clamp(min=NEG_LOG_EPS))
    mask_len = schedule_mask_len(step, timesteps, n, unknown.sum(dim=-1), schedule)
    tau = next_temperature(tau, step, timesteps)
    masking = mask_by_random_topk(mask_len, log_conf, ~unknown, tau, generators)
    next_ids = torch.where(masking, torch.full_like(chosen, mask_id), chosen + image_offset)
    return StepResult(next_ids=next_ids, chosen=chosen, logps=logps, tau=tau)


# --------------------------------------------------------------------------------------------- model side
@dataclass
class T2IBatch:
    """Static per-batch tensors of a t2i CFG forward: cond rows first, then uncond rows."""

    ids: torch.Tensor
    """long [R,L] full sequences (R = 2B with CFG, else B); image slots hold the start state."""
    mask: torch.Tensor
    """bool [R,1,L,L] omni-attention mask (does not depend on the image ids)."""
    prefix_len: int
    """P = text block length (129 in Show-o); the image block ``[soi, N ids, eoi]`` starts at P."""
    num_image_tokens: int
    """N."""
    cfg: bool
    """True when the uncond rows are present."""

    def block_mask(self) -> torch.Tensor:
        """bool [R,1,N+2,L]: the image-block rows (they see every non-pad column)."""
        return self.mask[:, :, self.prefix_len:, :].contiguous()


def make_t2i_batch(tok, t2i, guidance_scale: float, device: torch.device | str | None = None) -> T2IBatch:
    """Stack cond (+ uncond when ``guidance_scale > 0``) sequences of ``t2i`` and build their omni masks."""
    from backbone.prompts import t2i_attention_mask

    cond = t2i.input_ids
    rows = [cond, t2i.uncond_input_ids] if guidance_scale > 0 else [cond]
    ids = torch.cat(rows, dim=0)
    if device is not None:
        ids = ids.to(device)
    n = int(t2i.num_image_tokens)
    length = ids.shape[1]
    p = length - n - 2
    if p < 0 or not bool((ids[:, p] == tok.soi_id).all()) or not bool((ids[:, -1] == tok.eoi_id).all()):
        raise ValueError(f"t2i inputs: expected [text(P) soi {n} image ids eoi] rows of length {length}; "
                         f"soi/eoi not found at {p}/{length - 1}")
    mask = t2i_attention_mask(ids, tok).to(torch.bool)
    return T2IBatch(ids=ids, mask=mask, prefix_len=p, num_image_tokens=n, cfg=guidance_scale > 0)


def code_rows(tok) -> slice:
    """lm_head rows of the image codes: ``image_offset .. image_offset + codebook_size``."""
    return slice(tok.image_offset, tok.image_offset + tok.codebook_size)


def compute_prefix_kv(model, batch: T2IBatch) -> list[KV]:
    """K/V of the text prefix (first P positions) of every row; exact because text rows never see image columns."""
    p = batch.prefix_len
    out = model(batch.ids[:, :p], batch.mask[:, :, :p, :p], use_cache=True, compute_logits=False)
    return out.past_key_values


def image_block_ids(batch: T2IBatch, image_ids: torch.Tensor) -> torch.Tensor:
    """long [R, N+2]: ``[soi, image_ids, eoi]`` for every row (cond and uncond share the image state)."""
    p, n = batch.prefix_len, batch.num_image_tokens
    reps = batch.ids.shape[0] // image_ids.shape[0]
    block = batch.ids[:, p:].clone()
    block[:, 1:n + 1] = image_ids.repeat(reps, 1)
    return block


def cfg_code_logits(model, tok, batch: T2IBatch, image_ids: torch.Tensor, guidance_scale: float,
                    prefix_kv: list[KV] | None = None, block_mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[B,N,K]`` CFG logits over the code columns for the image state ``image_ids [B,N]``.

    With ``prefix_kv`` only the image block runs (positions P..L-1); without it, the full sequence (same numbers up
    to float rounding). Gradients flow when enabled (replay); ``prefix_kv`` may carry gradients too."""
    p, n = batch.prefix_len, batch.num_image_tokens
    block = image_block_ids(batch, image_ids)
    rows = code_rows(tok)
    if prefix_kv is not None:
        bm = batch.block_mask() if block_mask is None else block_mask
        logits = model(block, bm, past_key_values=prefix_kv, logits_positions=slice(1, n + 1),
                       logits_rows=rows).logits
    else:
        ids = torch.cat([batch.ids[:, :p], block], dim=1)
        logits = model(ids, batch.mask, logits_positions=slice(p + 1, p + 1 + n), logits_rows=rows).logits
    if not batch.cfg:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return (1 + guidance_scale) * cond - guidance_scale * uncond


# --------------------------------------------------------------------------------------------- sampler
@dataclass
class Trajectory:
    """What a rollout records per MaskGIT step (T' = steps run so far)."""

    states: torch.Tensor
    """long [B,T',N] image-block input ids before each step (mask id or offset code ids)."""
    chosen: torch.Tensor
    """long [B,T',N] code ids chosen at each step (all positions)."""
    logps: torch.Tensor
    """float32 [B,T',N] rollout log-probs of ``chosen`` under the CFG policy."""
    final_ids: torch.Tensor | None
    """long [B,N] code ids of the finished grid (None while paused)."""


@dataclass
class SamplerState:
    """Everything needed to continue a MaskGIT run bit-identically (incl. τ and the generators themselves)."""

    batch: T2IBatch
    """Static cond/uncond sequences and masks."""
    image_ids: torch.Tensor
    """long [B,N] current image-block input ids."""
    generators: list[torch.Generator | None]
    """One generator per sample (advanced in place by each step)."""
    tau: float
    """Current Gumbel temperature."""
    step: int = 0
    """Steps run so far."""
    timesteps: int = 50
    """T."""
    prefix_kv: list[KV] | None = None
    """Cached text-prefix K/V of the R rows (None when prefix reuse is off)."""
    block_mask: torch.Tensor | None = None
    """Cached image-block mask rows [R,1,N+2,L]."""
    states: list[torch.Tensor] = field(default_factory=list)
    """Per step: image ids before the step [B,N]."""
    chosen: list[torch.Tensor] = field(default_factory=list)
    """Per step: chosen code ids [B,N]."""
    logps: list[torch.Tensor] = field(default_factory=list)
    """Per step: rollout log-probs [B,N]."""

    @property
    def batch_size(self) -> int:
        """B (samples, not CFG rows)."""
        return self.image_ids.shape[0]

    @property
    def done(self) -> bool:
        """All T steps have run."""
        return self.step >= self.timesteps

    @property
    def final_ids(self) -> torch.Tensor | None:
        """long [B,N] code ids of the finished grid (the last step's chosen ids), None until done."""
        return self.chosen[-1] if self.done else None

    @property
    def trajectory(self) -> Trajectory:
        """The recorded steps so far, stacked."""
        b, n = self.image_ids.shape
        dev = self.image_ids.device
        if not self.states:
            empty = torch.empty(b, 0, n, dtype=torch.long, device=dev)
            return Trajectory(empty, empty.clone(), torch.empty(b, 0, n, device=dev), None)
        return Trajectory(states=torch.stack(self.states, 1), chosen=torch.stack(self.chosen, 1),
                          logps=torch.stack(self.logps, 1), final_ids=self.final_ids)

    def select(self, index: list[int] | torch.Tensor) -> SamplerState:
        """A new state holding only the samples ``index`` (e.g. the ones that passed a DSOG screen)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.image_ids.device)
        b = self.batch_size
        rows = torch.cat([idx, idx + b]) if self.batch.cfg else idx
        batch = T2IBatch(ids=self.batch.ids[rows], mask=self.batch.mask[rows], prefix_len=self.batch.prefix_len,
                         num_image_tokens=self.batch.num_image_tokens, cfg=self.batch.cfg)
        kv = None if self.prefix_kv is None else [(k[rows], v[rows]) for k, v in self.prefix_kv]
        return SamplerState(batch=batch, image_ids=self.image_ids[idx], generators=[self.generators[i] for i in
                            idx.tolist()], tau=self.tau, step=self.step, timesteps=self.timesteps, prefix_kv=kv,
                            block_mask=None if self.block_mask is None else self.block_mask[rows],
                            states=[s[idx] for s in self.states], chosen=[c[idx] for c in self.chosen],
                            logps=[lp[idx] for lp in self.logps])


@dataclass
class PackedBatch(T2IBatch):
    """Several sampler states' rows in one CFG batch (:meth:`MaskGITSampler.step_many`)."""

    prefix_kv: list[KV] | None = None
    """Their text-prefix K/V, stacked like ``ids`` (None when prefix reuse is off)."""
    block_mask: torch.Tensor | None = None
    """Their image-block mask rows, stacked like ``ids``."""


class MaskGITSampler:
    """Show-o's MaskGIT t2i sampler with CFG, trajectory recording and pause/resume."""

    def __init__(self, model, tok, config: SamplerConfig | None = None):
        """``model``: ShowoPhi; ``tok``: ShowoTokenizer (mask_id, image_offset, codebook_size, soi/eoi ids)."""
        self.model, self.tok = model, tok
        self.config = config or SamplerConfig()
        if self.config.timesteps < 1:
            raise ValueError(f"SamplerConfig.timesteps must be >= 1, got {self.config.timesteps}")
        mask_ratio(0, 1, self.config.schedule)  # validates the schedule name

    @torch.no_grad()
    def start(self, t2i, generators: list[torch.Generator | None]) -> SamplerState:
        """Prepare a run for ``t2i`` (T2IInputs; image slots = mask id, or a partial state); one generator per
        sample (D7). Computes the prefix K/V once."""
        cfg = self.config
        if len(generators) != t2i.input_ids.shape[0]:
            raise ValueError(f"generators: need one per sample ({t2i.input_ids.shape[0]}), got {len(generators)}")
        batch = make_t2i_batch(self.tok, t2i, cfg.guidance_scale, device=self.model.device)
        p, n = batch.prefix_len, batch.num_image_tokens
        image_ids = batch.ids[:t2i.input_ids.shape[0], p + 1:p + 1 + n].clone()
        state = SamplerState(batch=batch, image_ids=image_ids, generators=list(generators),
                             tau=float(cfg.gumbel_temperature), timesteps=cfg.timesteps)
        if cfg.reuse_prefix_kv:
            state.prefix_kv = compute_prefix_kv(self.model, batch)
            state.block_mask = batch.block_mask()
        return state

    @torch.no_grad()
    def step_logits(self, state: SamplerState) -> torch.Tensor:
        """fp32 [B,N,K] CFG code logits for the state's current image ids (the sampler's own code path)."""
        return cfg_code_logits(self.model, self.tok, state.batch, state.image_ids, self.config.guidance_scale,
                               prefix_kv=state.prefix_kv, block_mask=state.block_mask)

    @torch.no_grad()
    def run(self, state: SamplerState, stop_after_step: int | None = None) -> SamplerState:
        """Run steps until ``stop_after_step`` steps have been done in total (None = all T); mutates and returns
        ``state``. Resuming a paused state gives bit-identical results to an uninterrupted run."""
        end = state.timesteps if stop_after_step is None else min(int(stop_after_step), state.timesteps)
        while state.step < end:
            logits = self.step_logits(state)
            res = maskgit_step(logits, state.image_ids, state.step, state.timesteps, state.tau, state.generators,
                               self.tok.mask_id, self.tok.image_offset, self.config.schedule)
            state.states.append(state.image_ids)
            state.chosen.append(res.chosen)
            state.logps.append(res.logps)
            state.image_ids, state.tau = res.next_ids, res.tau
            state.step += 1
        return state

    @torch.no_grad()
    def step_many(self, states: list[SamplerState]) -> None:
        """One MaskGIT step for each of ``states`` (independent runs, each at its own step, τ and generators) in a
        single transformer forward: the continuous-batching engine's step (actors/rollout/continuous.py).

        The states' rows are packed (cond rows of every state, then their uncond rows; prefix K/V and masks likewise)
        and each state then takes :func:`maskgit_step` on its own slice of the logits with its own step and τ, so a
        state advances exactly as :meth:`run` would advance it alone up to the forward's arithmetic. On CPU with one
        torch thread the forward's rows do not depend on the other rows in the batch (tested bit for bit); on a GPU
        a different batch shape may pick another GEMM kernel (bf16: logits agree to about 1e-2 relative, see
        ``rollout.engine``). Mutates the states; every state must have steps left."""
        if not states:
            return
        if any(s.done for s in states):
            raise ValueError("step_many: a state has no steps left")
        packed = self._pack(states)
        logits = cfg_code_logits(self.model, self.tok, packed, torch.cat([s.image_ids for s in states]),
                                 self.config.guidance_scale, prefix_kv=packed.prefix_kv,
                                 block_mask=packed.block_mask)
        lo = 0
        for state in states:
            b = state.batch_size
            res = maskgit_step(logits[lo:lo + b], state.image_ids, state.step, state.timesteps, state.tau,
                               state.generators, self.tok.mask_id, self.tok.image_offset, self.config.schedule)
            lo += b
            state.states.append(state.image_ids)
            state.chosen.append(res.chosen)
            state.logps.append(res.logps)
            state.image_ids, state.tau = res.next_ids, res.tau
            state.step += 1

    def _pack(self, states: list[SamplerState]) -> "PackedBatch":
        """The static tensors of ``states`` stacked in one CFG batch; cached while the same states run together (the
        running batch only changes when a sample joins or leaves)."""
        cached = getattr(self, "_packed", None)   # (the states themselves, so their ids cannot be reused meanwhile)
        if cached is not None and len(cached[0]) == len(states) and all(a is b for a, b in zip(cached[0], states)):
            return cached[1]
        if len(states) == 1:
            s = states[0]
            packed = PackedBatch(ids=s.batch.ids, mask=s.batch.mask, prefix_len=s.batch.prefix_len,
                                 num_image_tokens=s.batch.num_image_tokens, cfg=s.batch.cfg, prefix_kv=s.prefix_kv,
                                 block_mask=s.block_mask)
        else:
            def rows(t: torch.Tensor, s: SamplerState, half: int) -> torch.Tensor:
                b = s.batch_size
                return t[half * b:(half + 1) * b]

            halves = (0, 1) if states[0].batch.cfg else (0,)

            def stack(get) -> torch.Tensor:
                return torch.cat([rows(get(s), s, h) for h in halves for s in states])

            first = states[0]
            kv = None
            if first.prefix_kv is not None:
                kv = [(stack(lambda s, i=i: s.prefix_kv[i][0]), stack(lambda s, i=i: s.prefix_kv[i][1]))
                      for i in range(len(first.prefix_kv))]
            packed = PackedBatch(ids=stack(lambda s: s.batch.ids), mask=stack(lambda s: s.batch.mask),
                                 prefix_len=first.batch.prefix_len, num_image_tokens=first.batch.num_image_tokens,
                                 cfg=first.batch.cfg, prefix_kv=kv,
                                 block_mask=None if first.block_mask is None else stack(lambda s: s.block_mask))
        self._packed = (list(states), packed)
        return packed

    def preview_ids(self, state: SamplerState) -> torch.Tensor:
        """long [B,N] code ids of the predicted full grid at the pause (the last step's chosen ids)."""
        if not state.chosen:
            raise ValueError("preview_ids: no MaskGIT step has run yet (state.step == 0)")
        return state.chosen[-1]

    def generate(self, t2i, generators: list[torch.Generator | None]) -> SamplerState:
        """start + run to the end."""
        return self.run(self.start(t2i, generators))
