"""Concept-injection data and losses (UniCTokens stages 1–3): understanding items, T2I items, Show-o losses.

Understanding data of a concept (stage 1; also the mmu part of stages 2, 3 and joint), each item an image + a
question + an answer (training data only, D14):

* recognition, positives: every training photo with the questions of ``positive_recognitions.json`` for that
  photo (else ``"Is <c> in this photo?"`` → ``"Yes, <c> is in this photo."``);
* recognition, negatives: every hard negative (``negative_example/``) and every ``random_images/`` photo, with the
  wording of ``random_recognitions.json`` (cycled; else ``"No, <c> is not in this photo."``);
* conversations: every (photo, QA) pair of ``conversations.json``;
* profile QA (image = the black placeholder, as UniCTokens' text-only questions): ``"Describe <c>."`` → the
  ``info`` sentence, and ``"What else do you know about <c>?"`` → all ``extra_info`` facts joined by spaces.

mmu format (Show-o / UniCTokens, research notes A5, B2): ``<|mmu|> <|soi|> image <|eoi|> <|sot|>`` +
``"USER: " + prefix + " " + question + " ASSISTANT:"`` + ``" " + answer`` + ``<|eot|>``, with UniCTokens' system
prefix ``"<c> is <token_0>…<token_15>."`` (plus the stage-3 tokens when they exist) prepended to the question.
Loss: shifted next-token CE on the answer tokens (and the closing eot) only, mean over answer tokens.

T2I (Show-o's ``mask_or_random_replace_tokens`` + ``loss_t2i``, research notes A9): per image ``t ~ U(0, 1)``,
``round(N·cos(π/2·t))`` (at least 1) random positions are replaced by the mask id; unshifted CE over the block
``<|soi|> image <|eoi|>`` where the labels are the masked codes (other image positions ignored) and, as in Show-o,
``<|soi|>`` / ``<|eoi|>`` labelled with themselves. Prompt ``"A photo of <token_0>…<token_23> <c>."``.

Both losses can mask logit columns (``inactive``): the rows of tokens that do not exist yet at this stage and the
rows of other concepts get ``-inf``, so training one concept in a multi-concept model equals UniCTokens' training
with only that concept's tokens added so far.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backbone.maskgit import MaskGITSampler
from backbone.prompts import MMU_TEMPLATE, build_t2i_inputs, mmu_attention_mask, t2i_attention_mask
from rl.data.reader import Concept, ConceptDataset, ImageRef

__all__ = ["Stage3Config", "MMUItem", "understanding_items", "t2i_image_refs", "stage3_items", "MMUBatch",
           "T2IBatch", "build_mmu_batch", "build_t2i_batch", "mmu_loss", "t2i_loss", "masked_logits", "preview_steps",
           "diff_masked_grids", "stage3_diff_codes", "shuffled", "BLACK", "REC_QUESTION", "REC_YES", "REC_NO"]

BLACK = "black"
"""Image key of the black placeholder."""
REC_QUESTION = "Is {c} in this photo?"
REC_YES = "Yes, {c} is in this photo."
REC_NO = "No, {c} is not in this photo."
PROFILE_QUESTION = "Describe {c}."
FACTS_QUESTION = "What else do you know about {c}?"


@dataclass
class Stage3Config:
    """Stage-3 data: generated images and the steps whose predicted grids are compared with the final one."""

    num_images: int = 8
    """Images generated per concept from the t2i prompt (our choice; UniCTokens' count is not documented)."""
    preview_steps: list[int] = field(default_factory=lambda: [10, 35])
    """Steps (of ``reference_timesteps``) whose predicted grids are diffed against the final grid (UniCTokens)."""
    reference_timesteps: int = 50
    """T the preview steps refer to; they are scaled to ``sampler.timesteps``."""


@dataclass
class MMUItem:
    """One understanding example: image key, question and answer (``<c>`` written as the concept string)."""

    image: str
    """Key into the code table (``train/3.png``, ``neg/0.png``, ``random/1.png``, ``black``, ``stage3/…``)."""
    question: str
    """The question without the system prefix."""
    answer: str
    """The reference answer (trained with CE)."""
    source: str
    """recognition_pos | recognition_neg | conversation | profile | stage3."""


def understanding_items(dataset: ConceptDataset, concept: str) -> tuple[list[MMUItem], dict[str, ImageRef]]:
    """The concept's understanding items and the images they use (key → ImageRef; ``black`` included)."""
    c: Concept = dataset.concept(concept)
    tok = c.info.token
    refs: dict[str, ImageRef] = {BLACK: dataset.black_image}
    items: list[MMUItem] = []
    pos_by_image: dict[str, list] = {}
    for qa in c.train.positive_recognitions:
        pos_by_image.setdefault(qa.image or "", []).append(qa)
    for ref in c.train.images:
        key = f"train/{ref.name}"
        refs[key] = ref
        qas = pos_by_image.get(ref.name) or []
        if qas:
            items += [MMUItem(key, qa.query, qa.answer, "recognition_pos") for qa in qas]
        else:
            items.append(MMUItem(key, REC_QUESTION.format(c=tok), REC_YES.format(c=tok), "recognition_pos"))
    neg_wording = [(qa.query, qa.answer) for qa in c.train.random_recognitions] or \
                  [(REC_QUESTION.format(c=tok), REC_NO.format(c=tok))]
    negatives = [(f"neg/{r.name}", r) for r in c.train.negative_examples] + \
                [(f"random/{r.name}", r) for r in dataset.random_images]
    for i, (key, ref) in enumerate(negatives):
        refs[key] = ref
        q, a = neg_wording[i % len(neg_wording)]
        items.append(MMUItem(key, q, a, "recognition_neg"))
    for name in sorted(c.train.conversations):
        items += [MMUItem(f"train/{name}", qa.query, qa.answer, "conversation") for qa in c.train.conversations[name]]
    items.append(MMUItem(BLACK, PROFILE_QUESTION.format(c=tok), c.info.info, "profile"))
    if c.info.extra_info:
        items.append(MMUItem(BLACK, FACTS_QUESTION.format(c=tok), " ".join(c.info.extra_info), "profile"))
    return items, refs


def t2i_image_refs(dataset: ConceptDataset, concept: str) -> dict[str, ImageRef]:
    """The concept's T2I training images: ``cropped/`` (else the training photos), key ``crop/<name>``."""
    return {f"crop/{r.name}": r for r in dataset.concept(concept).train.cropped}


def stage3_items(concept_token: str, info: str, keys: Sequence[str]) -> list[MMUItem]:
    """Understanding items on the stage-3 diff images: for each key, the positive recognition question and the
    profile question (the diff images show detail the model generated for ``<c>``)."""
    out = []
    for k in keys:
        out.append(MMUItem(k, REC_QUESTION.format(c=concept_token), REC_YES.format(c=concept_token), "stage3"))
        out.append(MMUItem(k, PROFILE_QUESTION.format(c=concept_token), info, "stage3"))
    return out


# --------------------------------------------------------------------------------------------- batches
@dataclass
class MMUBatch:
    """Left-padded mmu sequences with answer labels."""

    input_ids: torch.Tensor
    """long [B, L]."""
    attention_mask: torch.Tensor
    """bool [B, 1, L, L] (causal + the image prefix; no pads)."""
    position_ids: torch.Tensor
    """long [B, L]: 0 at each row's first non-pad token."""
    labels: torch.Tensor
    """long [B, M]: targets of the last M positions (the answers, right-aligned), -100 elsewhere."""


def build_mmu_batch(tok, items: Sequence[MMUItem], codes: dict[str, torch.Tensor], prefix: str,
                    template: str = MMU_TEMPLATE) -> MMUBatch:
    """Sequences ``[mmu soi image eoi sot] + tok(template(prefix + " " + q)) + tok(" " + answer) + [eot]``."""
    seqs, answers = [], []
    for it in items:
        img = codes[it.image].reshape(-1).tolist()
        q = f"{prefix} {it.question}" if prefix else it.question
        prompt = [tok.mmu_id, tok.soi_id, *[c + tok.image_offset for c in img], tok.eoi_id, tok.sot_id,
                  *tok.encode(template.format(q))]
        ans = [*tok.encode(" " + it.answer.strip()), tok.eot_id]
        seqs.append(prompt + ans)
        answers.append(ans)
    L = max(len(s) for s in seqs)
    M = max(len(a) for a in answers)
    ids = torch.tensor([[tok.pad_id] * (L - len(s)) + s for s in seqs], dtype=torch.long)
    labels = torch.tensor([[-100] * (M - len(a)) + a for a in answers], dtype=torch.long)
    pads = torch.tensor([L - len(s) for s in seqs])
    pos = (torch.arange(L)[None] - pads[:, None]).clamp(min=0)
    return MMUBatch(ids, mmu_attention_mask(ids, tok), pos, labels)


@dataclass
class T2IBatch:
    """Masked t2i sequences with Show-o's unshifted labels on the image block."""

    input_ids: torch.Tensor
    """long [B, L]: text block, soi, image ids (some = mask id), eoi."""
    attention_mask: torch.Tensor
    """bool [B, 1, L, L] (omni mask)."""
    labels: torch.Tensor
    """long [B, N+2]: targets of positions P..L-1 (soi, image, eoi); -100 at unmasked image positions."""
    text_len: int
    """P, the length of the text block."""


def build_t2i_batch(tok, prompts: Sequence[str], grids: torch.Tensor, generator: torch.Generator,
                    max_text_len: int = 128) -> T2IBatch:
    """Show-o's cosine-schedule masking of ``grids`` (code ids ``[B, N]``) with ``generator``; see module doc."""
    grids = torch.as_tensor(grids).long().cpu()
    b, n = grids.shape
    t2i = build_t2i_inputs(tok, list(prompts), n, max_text_len=max_text_len, image_ids=grids)
    t = torch.rand(b, generator=generator)
    num_masked = (n * torch.cos(t * math.pi * 0.5)).round().clamp(min=1).long()
    order = torch.rand(b, n, generator=generator).argsort(dim=-1).argsort(dim=-1)  # a random rank per position
    masked = order < num_masked[:, None]
    ids = t2i.input_ids.clone()
    img = ids[:, t2i.image_slice]
    ids[:, t2i.image_slice] = torch.where(masked, torch.full_like(img, tok.mask_id), img)
    labels = torch.full((b, n + 2), -100, dtype=torch.long)
    labels[:, 0], labels[:, -1] = tok.soi_id, tok.eoi_id
    labels[:, 1:-1] = torch.where(masked, grids + tok.image_offset, torch.full_like(grids, -100))
    return T2IBatch(ids, t2i_attention_mask(ids, tok), labels, t2i.text_len)


# --------------------------------------------------------------------------------------------- losses
def masked_logits(logits: torch.Tensor, inactive: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the columns ``inactive`` (long ids) set to -inf (the tokens that do not exist yet)."""
    if inactive is None or inactive.numel() == 0:
        return logits
    col = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    col[inactive.to(logits.device)] = True
    return logits.masked_fill(col, float("-inf"))


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    labels = labels.to(logits.device)
    n = int((labels != -100).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return loss, n


def mmu_loss(model, batch: MMUBatch, inactive: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(mean next-token CE over the answer tokens, number of answer tokens). Logits only at the last M+1
    positions (the answers are right-aligned)."""
    dev = model.device
    L, M = batch.input_ids.shape[1], batch.labels.shape[1]
    out = model(batch.input_ids.to(dev), batch.attention_mask.to(dev), position_ids=batch.position_ids.to(dev),
                logits_positions=slice(L - 1 - M, L - 1))
    return _ce(masked_logits(out.logits, inactive), batch.labels)


def t2i_loss(model, batch: T2IBatch, inactive: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(Show-o's unshifted t2i CE over the image block, number of labelled positions)."""
    dev = model.device
    L = batch.input_ids.shape[1]
    out = model(batch.input_ids.to(dev), batch.attention_mask.to(dev), logits_positions=slice(batch.text_len, L))
    return _ce(masked_logits(out.logits, inactive), batch.labels)


# --------------------------------------------------------------------------------------------- stage 3
def preview_steps(timesteps: int, steps: Sequence[int] = (10, 35), reference_timesteps: int = 50) -> list[int]:
    """UniCTokens' preview steps (10 and 35 of 50) scaled to ``timesteps``, each in [1, timesteps - 1]."""
    if timesteps < 2:
        raise ValueError(f"stage 3 needs sampler.timesteps >= 2, got {timesteps}")
    out = [min(max(int(round(s * timesteps / reference_timesteps)), 1), timesteps - 1) for s in steps]
    return sorted(set(out))


@torch.no_grad()
def diff_masked_grids(sampler, t2i, generators: list, steps: Sequence[int], fill: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """Generate with ``sampler`` (MaskGITSampler), pausing after each of ``steps`` for the predicted grid.

    Returns (final ``[B, N]``, {step: diff-masked grid ``[B, N]``}, {step: changed fraction} as ``[S]``): the
    diff-masked grid keeps the final codes where the step's predicted grid differs from the final grid and
    ``fill`` (``[N]`` codes, the black image) elsewhere."""
    state = sampler.start(t2i, generators)
    previews = {}
    for s in sorted(steps):
        state = sampler.run(state, stop_after_step=s)
        previews[s] = sampler.preview_ids(state).clone()
    state = sampler.run(state)
    final = state.final_ids
    fill = fill.to(final.device).reshape(1, -1).expand_as(final)
    grids, frac = {}, []
    for s, p in previews.items():
        changed = p != final
        grids[s] = torch.where(changed, final, fill)
        frac.append(changed.float().mean())
    return final, grids, torch.stack(frac)


def stage3_diff_codes(model, tok, num_image_tokens: int, sampler_cfg, prompt: str, generators: list,
                      cfg: Stage3Config, fill: torch.Tensor, max_text_len: int = 128
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Stage-3 data: ``len(generators)`` images of ``prompt`` (eval mode, no grad); returns ({``stage3/step<s>/<i>``:
    diff-masked code grid [N]} on CPU, {``stage3/changed_step<s>``: mean fraction of changed positions})."""
    steps = preview_steps(sampler_cfg.timesteps, cfg.preview_steps, cfg.reference_timesteps)
    t2i = build_t2i_inputs(tok, [prompt] * len(generators), num_image_tokens, max_text_len=max_text_len)
    was = model.training
    model.eval()
    try:
        _, grids, frac = diff_masked_grids(MaskGITSampler(model, tok, sampler_cfg), t2i, generators, steps, fill)
    finally:
        model.train(was)
    codes = {f"stage3/step{s}/{i}": row for s, g in grids.items() for i, row in enumerate(g.cpu())}
    return codes, {f"stage3/changed_step{s}": float(f) for s, f in zip(sorted(grids), frac)}


def shuffled(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) (numpy PCG64)."""
    return np.random.default_rng(seed).permutation(n).tolist()
