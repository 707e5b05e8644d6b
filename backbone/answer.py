"""Answer (IR) generation for understanding prompts, with a KV cache, and its teacher-forced log-probs.

Show-o's ``mmu_generate`` re-runs the full sequence per token at batch 1; here the prompt runs once
(``use_cache``) and each new token runs alone with ``past_key_values`` and a growing mask row (the prompt's last
row, i.e. every non-pad prompt column, plus all generated tokens). Rows are left-padded; position ids start at 0 on
each row's first non-pad token, which is exactly Show-o's numerics (its mmu runs at batch 1, without pads) and makes
a sample's numbers independent of how much padding its batch needed.

Sampling distribution (design D3): ``logits / temperature``, then optional top-k filtering (Show-o's rule: keep
logits ``>=`` the k-th largest), then softmax over the full vocabulary. The recorded log-prob of a token is under
that same distribution (top-k renormalised); :func:`answer_logprobs` recomputes it teacher-forced. Each sample
draws only from its own generator (D7). Generation stops per sample at ``tok.eot_id`` (included, mask True).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Answers:
    """Generated answers, right-padded with ``eot``."""

    ids: torch.Tensor
    """long [B,M] token ids (eot included if produced, then eot padding)."""
    logps: torch.Tensor
    """float32 [B,M] log-probs of ``ids`` under the sampling distribution (0 where ``mask`` is False)."""
    mask: torch.Tensor
    """bool [B,M] True for generated tokens (up to and including the first eot)."""
    texts: list[str]
    """Decoded answers without the eot."""


def token_logprobs_dist(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """fp32 log-probs ``[..., V]`` of the sampling distribution: temperature, then top-k (others −inf)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def extend_mask(prompt_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """bool ``[B,1,L+m,L+m]``: the prompt mask, plus m causal rows that see every column the prompt's last row sees."""
    b, _, length, _ = prompt_mask.shape
    prompt_mask = prompt_mask.to(torch.bool)
    if num_new == 0:
        return prompt_mask
    dev = prompt_mask.device
    top = torch.cat([prompt_mask, torch.zeros(b, 1, length, num_new, dtype=torch.bool, device=dev)], dim=-1)
    left = prompt_mask[:, :, -1:, :].expand(b, 1, num_new, length)
    causal = torch.ones(num_new, num_new, dtype=torch.bool, device=dev).tril().expand(b, 1, num_new, num_new)
    return torch.cat([top, torch.cat([left, causal], dim=-1)], dim=2)


def answer_mask(answer_ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """bool ``[B,M]``: True up to and including the first ``eot_id`` of each row."""
    is_eot = (answer_ids == eot_id).long()
    before = torch.cumsum(is_eot, dim=1) - is_eot  # eots strictly before this position
    return before == 0


def _prompt(tok, mmu, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B,L], bool mask [B,1,L,L], pad lengths [B])."""
    from backbone.prompts import mmu_attention_mask

    ids = mmu.input_ids.to(device)
    mask = getattr(mmu, "attention_mask", None)
    if mask is None or mask.dim() != 4:
        mask = mmu_attention_mask(ids, tok)
    return ids, mask.to(device).to(torch.bool), left_pad_lengths(ids, tok.pad_id)


def left_pad_lengths(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """long [B]: length of the leading run of ``pad_id`` in each row."""
    not_pad = (ids != pad_id).long()
    return (torch.cumsum(not_pad, dim=1) == 0).sum(dim=1)


def position_ids(pad_lens: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """long [B, length]: ``arange(start, start+length) − pad_len`` clamped at 0 (pads sit at position 0)."""
    pos = torch.arange(start, start + length, device=pad_lens.device)[None] - pad_lens[:, None]
    return pos.clamp(min=0)


def _pick(logp: torch.Tensor, logits: torch.Tensor, greedy: bool,
          generators: list[torch.Generator | None]) -> torch.Tensor:
    if greedy:
        return logits.argmax(dim=-1)
    probs = logp.exp()
    return torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0] for i in range(probs.shape[0])])


@torch.no_grad()
def generate_answers(model, tok, mmu, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
                     greedy: bool = False, generators: list[torch.Generator | None] | None = None,
                     use_cache: bool = True) -> Answers:
    """Sample (or greedily decode) answers for the left-padded understanding prompts ``mmu`` (MMUInputs).

    ``generators``: one per sample (D7); None = the global RNG. ``use_cache=False`` recomputes the whole sequence
    per token (Show-o's loop; a reference for tests)."""
    dev = model.device
    ids, pmask, pads = _prompt(tok, mmu, dev)
    b, length = ids.shape
    if generators is None:
        generators = [None] * b
    if len(generators) != b:
        raise ValueError(f"generators: need one per sample ({b}), got {len(generators)}")
    eot = tok.eot_id
    out_ids = torch.full((b, max_new_tokens), eot, dtype=torch.long, device=dev)
    out_lp = torch.zeros(b, max_new_tokens, device=dev)
    out_mask = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    kv = None
    for t in range(max_new_tokens):
        if use_cache:
            if t == 0:
                res = model(ids, pmask, position_ids=position_ids(pads, 0, length), use_cache=True,
                            logits_positions=slice(length - 1, length))
            else:
                row = extend_mask(pmask, t)[:, :, -1:, :]
                res = model(out_ids[:, t - 1:t], row, position_ids=position_ids(pads, length + t - 1, 1),
                            past_key_values=kv, use_cache=True)
            kv = res.past_key_values
        else:
            seq = torch.cat([ids, out_ids[:, :t]], dim=1)
            res = model(seq, extend_mask(pmask, t), position_ids=position_ids(pads, 0, length + t),
                        logits_positions=slice(length + t - 1, length + t))
        logits = res.logits[:, -1]
        logp = token_logprobs_dist(logits, temperature, top_k)
        nxt = _pick(logp, logits, greedy, generators)
        nxt = torch.where(finished, torch.full_like(nxt, eot), nxt)
        out_ids[:, t] = nxt
        out_lp[:, t] = torch.where(finished, torch.zeros(b, device=dev), logp.gather(-1, nxt[:, None])[:, 0])
        out_mask[:, t] = ~finished
        finished = finished | (nxt == eot)
        if bool(finished.all()):
            break
    texts = []
    for i in range(b):
        toks = out_ids[i][out_mask[i] & (out_ids[i] != eot)].tolist()
        texts.append(tok.decode(toks))
    return Answers(ids=out_ids, logps=out_lp, mask=out_mask, texts=texts)


def answer_logprobs(model, tok, mmu, answer_ids: torch.Tensor, temperature: float = 1.0,
                    top_k: int | None = None) -> torch.Tensor:
    """Teacher-forced fp32 ``[B,M]`` log-probs of ``answer_ids`` (right-padded with eot) after the prompts, under
    the rollout's distribution (same temperature / top-k, D3); 0 after the first eot. Differentiable."""
    dev = model.device
    ids, pmask, pads = _prompt(tok, mmu, dev)
    answer_ids = answer_ids.to(dev).long()
    length, m = ids.shape[1], answer_ids.shape[1]
    seq = torch.cat([ids, answer_ids], dim=1)
    logits = model(seq, extend_mask(pmask, m), position_ids=position_ids(pads, 0, length + m),
                   logits_positions=slice(length - 1, length + m - 1)).logits
    logp = token_logprobs_dist(logits, temperature, top_k).gather(-1, answer_ids[..., None])[..., 0]
    return torch.where(answer_mask(answer_ids, tok.eot_id), logp, torch.zeros_like(logp))
