"""Show-o sequence layouts (t2i, mmu) and their attention masks.

t2i (``UniversalPrompting.t2i_gen_prompt``): text block ``[PAD]*n + <|t2i|> + bos + text + eos`` left-padded to
``max_text_len + 1`` (129), truncated to ``ids[:128] + [eos]`` when longer; then ``<|soi|>``, N image slots,
``<|eoi|>``. Uncond (CFG) = the empty prompt ``[PAD]*126 + <|t2i|> + bos + eos`` with the same image part.

mmu (``inference_mmu.py`` without CLIP): ``<|mmu|> <|soi|> image <|eoi|> <|sot|>`` + ``tok(template(question))``,
left-padded with ``[PAD]`` across the batch.

Masks are bool ``[B,1,L,L]``, True = may attend. Pads are the leading run of ``pad_id`` in each row; no row attends
to a pad column and pad rows attend only to themselves (so no row is empty and non-pad outputs are unaffected).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backbone.tokenizer import ShowoTokenizer

MMU_TEMPLATE = "USER: {} ASSISTANT:"
"""UniCTokens' mmu question template (Show-o's demo uses ``"USER: \\n{} ASSISTANT:"``)."""


@dataclass
class T2IInputs:
    """A batch of t2i sequences (cond + uncond) with the image block at ``image_slice``."""

    input_ids: torch.Tensor
    """long ``[B, L]``: text block, ``<|soi|>``, N image slots, ``<|eoi|>``."""
    uncond_input_ids: torch.Tensor
    """long ``[B, L]``: Show-o's empty prompt + the same image part (the CFG uncond branch)."""
    text_len: int
    """Length of the text block (= max_text_len + 1 = 129 for Show-o)."""
    num_image_tokens: int
    """N image slots (Show-o 512: 1024)."""
    truncated: list[bool]
    """Per sample: the text did not fit and was cut to ``ids[:max_text_len] + [eos]``."""

    @property
    def image_start(self) -> int:
        """Position of the first image slot (just after ``<|soi|>``)."""
        return self.text_len + 1

    @property
    def image_slice(self) -> slice:
        """Positions of the N image slots."""
        return slice(self.text_len + 1, self.text_len + 1 + self.num_image_tokens)

    @property
    def seq_len(self) -> int:
        """Total length L = text_len + N + 2."""
        return self.input_ids.shape[1]


@dataclass
class MMUInputs:
    """A batch of left-padded understanding prompts."""

    input_ids: torch.Tensor
    """long ``[B, L]`` left-padded with ``pad_id``."""
    attention_mask: torch.Tensor
    """bool ``[B, 1, L, L]`` (:func:`mmu_attention_mask`)."""
    prompt_lens: list[int]
    """Unpadded length of each prompt."""
    prefix_len: int
    """Tokens from ``<|mmu|>`` to ``<|eoi|>`` inclusive (N + 3); the bidirectional prefix."""


def _pad_lens(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Length of the leading run of ``pad_id`` per row, long ``[B]``."""
    not_pad = input_ids != pad_id
    first = torch.where(not_pad.any(1), not_pad.int().argmax(1), torch.full_like(not_pad[:, 0], input_ids.shape[1],
                                                                                  dtype=torch.long))
    return first.long()


def _finish_pads(mask: torch.Tensor, pad_lens: torch.Tensor) -> torch.Tensor:
    """No attention to pad columns; pad rows see only themselves. mask ``[B,L,L]`` -> ``[B,1,L,L]``."""
    L = mask.shape[-1]
    pos = torch.arange(L, device=mask.device)
    is_pad = pos[None, :] < pad_lens[:, None]  # [B, L]
    mask = mask & ~is_pad[:, None, :]
    eye = torch.eye(L, dtype=torch.bool, device=mask.device)
    mask = torch.where(is_pad[:, :, None], eye[None], mask)
    return mask[:, None]


def t2i_attention_mask(input_ids: torch.Tensor, tok: ShowoTokenizer) -> torch.Tensor:
    """Show-o's omni mask (``create_attention_mask_predict_next``, rm_pad_in_image): bool ``[B,1,L,L]``.

    Text positions (outside ``<|soi|>..<|eoi|>``) are causal; rows ``soi..eoi`` attend to every position; nobody
    attends to pads. Text never sees image positions that come after it."""
    B, L = input_ids.shape
    soi = (input_ids == tok.soi_id).long()
    eoi = (input_ids == tok.eoi_id).long()
    in_image = (soi.cumsum(1) > eoi.cumsum(1)) | (eoi == 1)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=input_ids.device))
    mask = torch.where(in_image[:, :, None], torch.ones_like(causal)[None], causal[None]).expand(B, L, L)
    return _finish_pads(mask, _pad_lens(input_ids, tok.pad_id))


def mmu_attention_mask(input_ids: torch.Tensor, tok: ShowoTokenizer) -> torch.Tensor:
    """Causal mask where every non-pad row also sees its whole prefix up to and including ``<|eoi|>``.

    Each row uses its own first ``<|eoi|>`` (rows are left-padded differently); no attention to pads."""
    B, L = input_ids.shape
    is_eoi = input_ids == tok.eoi_id
    if not bool(is_eoi.any(1).all()):
        raise ValueError("mmu_attention_mask: every row needs an <|eoi|> token")
    eoi_pos = is_eoi.int().argmax(1)  # first eoi per row
    pos = torch.arange(L, device=input_ids.device)
    causal = pos[None, :, None] >= pos[None, None, :]
    prefix_col = pos[None, None, :] <= eoi_pos[:, None, None]
    mask = causal | prefix_col
    return _finish_pads(mask, _pad_lens(input_ids, tok.pad_id))


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool mask (True = may attend) -> additive float mask: 0 where allowed, ``finfo(dtype).min`` where blocked."""
    if mask.dtype != torch.bool:
        raise ValueError(f"to_additive_mask expects a bool mask, got {mask.dtype}")
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def t2i_text_block(tok: ShowoTokenizer, text_ids: list[int], max_text_len: int = 128) -> tuple[list[int], bool]:
    """``[PAD]*n + <|t2i|> + bos + ids + eos`` of length ``max_text_len + 1``; (block, truncated)."""
    ids = list(text_ids)
    if not ids or ids[0] != tok.bos_id:
        ids = [tok.bos_id, *ids]
    seq = [tok.t2i_id, *ids, tok.eos_id]
    total = max_text_len + 1
    if len(seq) <= total:
        return [tok.pad_id] * (total - len(seq)) + seq, False
    return seq[:max_text_len] + [tok.eos_id], True


def build_t2i_inputs(tok: ShowoTokenizer, texts: list[str], num_image_tokens: int, max_text_len: int = 128,
                     image_ids: torch.Tensor | None = None) -> T2IInputs:
    """Cond and uncond t2i sequences. Image slots are ``mask_id`` unless ``image_ids`` (code ids ``[B, N]``,
    0..codebook_size-1) are given; those are offset by ``tok.image_offset``."""
    B = len(texts)
    if image_ids is None:
        img = torch.full((B, num_image_tokens), tok.mask_id, dtype=torch.long)
    else:
        image_ids = torch.as_tensor(image_ids).long().cpu()
        if tuple(image_ids.shape) != (B, num_image_tokens):
            raise ValueError(f"image_ids must be [{B}, {num_image_tokens}], got {tuple(image_ids.shape)}")
        if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= tok.codebook_size):
            raise ValueError(f"image_ids must be code ids in [0, {tok.codebook_size}); got "
                             f"[{int(image_ids.min())}, {int(image_ids.max())}]")
        img = image_ids + tok.image_offset
    soi = torch.full((B, 1), tok.soi_id, dtype=torch.long)
    eoi = torch.full((B, 1), tok.eoi_id, dtype=torch.long)
    blocks, truncated = [], []
    for t in texts:
        block, cut = t2i_text_block(tok, tok.encode(t), max_text_len)
        blocks.append(block)
        truncated.append(cut)
    text = torch.tensor(blocks, dtype=torch.long).view(B, max_text_len + 1)
    uncond_block, _ = t2i_text_block(tok, [], max_text_len)
    uncond_text = torch.tensor([uncond_block] * B, dtype=torch.long).view(B, max_text_len + 1)
    return T2IInputs(input_ids=torch.cat([text, soi, img, eoi], 1),
                     uncond_input_ids=torch.cat([uncond_text, soi, img.clone(), eoi], 1),
                     text_len=max_text_len + 1, num_image_tokens=num_image_tokens, truncated=truncated)


def build_mmu_inputs(tok: ShowoTokenizer, image_ids: torch.Tensor, prompts: list[str],
                     template: str = MMU_TEMPLATE) -> MMUInputs:
    """``[<|mmu|>, <|soi|>, image (offset), <|eoi|>, <|sot|>] + tok(template.format(q))`` per question, left-padded.

    ``image_ids``: code ids ``[B, N]``. ``template`` ``"{}"`` passes the prompt through unchanged."""
    image_ids = torch.as_tensor(image_ids).long().cpu()
    if image_ids.dim() != 2 or image_ids.shape[0] != len(prompts):
        raise ValueError(f"image_ids must be [B={len(prompts)}, N], got {tuple(image_ids.shape)}")
    if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= tok.codebook_size):
        raise ValueError(f"image_ids must be code ids in [0, {tok.codebook_size})")
    seqs = []
    for codes, q in zip(image_ids.tolist(), prompts):
        prefix = [tok.mmu_id, tok.soi_id, *[c + tok.image_offset for c in codes], tok.eoi_id, tok.sot_id]
        seqs.append(prefix + tok.encode(template.format(q)))
    L = max(len(s) for s in seqs)
    ids = torch.tensor([[tok.pad_id] * (L - len(s)) + s for s in seqs], dtype=torch.long)
    return MMUInputs(input_ids=ids, attention_mask=mmu_attention_mask(ids, tok),
                     prompt_lens=[len(s) for s in seqs], prefix_len=image_ids.shape[1] + 3)
