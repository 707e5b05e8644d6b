"""UniCTokens concept tokens on a ShowoPhi (design D10): row surgery, checkpoints, and the D1 ``concept_rows`` mode.

Surgery (UniCTokens ``update_tokens_load_from_pretrained``): K = 1 + num_tokens new ids go right after the text
vocab; every image-code row and the mask row of ``embed_tokens`` and ``lm_head`` (weight AND bias) move up by K:
``new[off + K:] = old[off:]``, ``new[:off] = old[:off]``, ``new[off:off + K]`` = init or checkpoint.

Default init of the new rows (when no init tensors are given): ``<c>`` = mean of the class word's token rows (embed,
lm_head weight and bias) if a class word is given, else the mean of all text rows; each learnable token = mean of
the text rows + N(0, std of the text rows) noise from a fixed-seed generator (deterministic in every process).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backbone.phi import ShowoPhi
from backbone.tokenizer import ConceptTokens, ShowoTokenizer

log = logging.getLogger(__name__)

CKPT_PARTS = ("embed", "lm_head_weight", "lm_head_bias")
"""UniCTokens checkpoint parts: ``epoch_{N}_{part}.pt`` = the new rows only ([K, hidden] / [K])."""


def _rows_init(old: torch.Tensor, text_rows: int, k: int, class_ids: list[int] | None,
               gen: torch.Generator) -> torch.Tensor:
    """[k, *old.shape[1:]] default rows: row 0 = class-word mean (or text mean), others text mean + noise."""
    text = old[:text_rows].float()
    mean, std = text.mean(0), text.std(0) if text_rows > 1 else torch.zeros_like(text[0])
    out = mean.expand(k, *mean.shape).clone()
    if k > 1:
        noise = torch.randn((k - 1, *mean.shape), generator=gen, dtype=torch.float32)
        out[1:] += noise * std
    if class_ids:
        out[0] = old[class_ids].float().mean(0)
    return out.to(old.dtype)


def _check_init(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"add_concept_tokens: {name} must have shape {shape}, got {tuple(t.shape)}")


def add_concept_tokens(model: ShowoPhi, tok: ShowoTokenizer, concept: str, num_tokens: int,
                       class_word: str | None = None, init_embed: torch.Tensor | None = None,
                       init_lm_head_weight: torch.Tensor | None = None,
                       init_lm_head_bias: torch.Tensor | None = None, seed: int = 0) -> ConceptTokens:
    """Add ``<concept>`` + ``num_tokens`` tokens to ``tok`` and grow ``model``'s embedding and lm_head by K rows.

    ``init_*``: optional ``[K, hidden]`` / ``[K]`` rows in ``ConceptTokens.all_ids`` order (e.g. k-means centres).
    ``model.config.vocab_size`` is updated; the model must match ``tok.vocab_size`` before the call."""
    emb, head = model.model.embed_tokens, model.lm_head
    if emb.weight.shape[0] != tok.vocab_size or head.weight.shape[0] != tok.vocab_size:
        raise ValueError(f"model has {emb.weight.shape[0]} embedding rows / {head.weight.shape[0]} lm_head rows but "
                         f"the tokenizer's vocab_size is {tok.vocab_size}")
    k, d = num_tokens + 1, emb.weight.shape[1]
    _check_init("init_embed", init_embed, (k, d))
    _check_init("init_lm_head_weight", init_lm_head_weight, (k, d))
    _check_init("init_lm_head_bias", init_lm_head_bias, (k,))
    off = tok.image_offset
    class_ids = tok.encode(class_word) if class_word else None
    ct = tok.add_concept(concept, num_tokens)
    assert ct.concept_id == off and tok.image_offset == off + k
    gen = torch.Generator().manual_seed(seed)

    def grow(old: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
        new = old.new_empty((old.shape[0] + k, *old.shape[1:]))
        new[:off] = old[:off]
        new[off + k:] = old[off:]
        new[off:off + k] = (init.to(old.dtype) if init is not None
                            else _rows_init(old, off, k, class_ids, gen).to(old.device))
        return new

    with torch.no_grad():
        new_emb = grow(emb.weight.data, init_embed)
        new_w = grow(head.weight.data, init_lm_head_weight)
        new_b = grow(head.bias.data, init_lm_head_bias)
    emb.weight = nn.Parameter(new_emb, requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = new_emb.shape[0]
    head.weight = nn.Parameter(new_w, requires_grad=head.weight.requires_grad)
    head.bias = nn.Parameter(new_b, requires_grad=head.bias.requires_grad)
    head.out_features = new_w.shape[0]
    model.config.vocab_size = new_emb.shape[0]
    return ct


# ------------------------------------------------------------------------------------------- checkpoints


def concept_checkpoint_files(directory: str | os.PathLike, epoch: int) -> dict[str, Path]:
    """``{part: dir/epoch_{epoch}_{part}.pt}`` for the three UniCTokens parts."""
    return {part: Path(directory) / f"epoch_{epoch}_{part}.pt" for part in CKPT_PARTS}


def checkpoint_line(concept: str, directory: str | os.PathLike, epoch: int, rows: int, token_strs: list[str]) -> str:
    """The log line of a loaded concept checkpoint: path, epoch, rows and the token strings the rows belong to."""
    toks = token_strs if len(token_strs) <= 6 else [*token_strs[:4], "...", token_strs[-1]]
    files = ", ".join(f"epoch_{epoch}_{p}.pt" for p in CKPT_PARTS)
    return (f"concept checkpoint for {concept}: {Path(directory)} epoch {epoch} ({files}), "
            f"{rows} rows = tokens {' '.join(toks)}")


def concept_token_strings(names: list[str], num_tokens: int) -> dict[str, list[str]]:
    """The token strings each concept gets when ``names`` are added in this order (as
    :meth:`backbone.tokenizer.ShowoTokenizer.add_concept` names them: ``<token_i>`` first, ``<name_token_i>`` after)."""
    return {n: [f"<{n}>", *(f"<{'token' if i == 0 else n + '_token'}_{j}>" for j in range(num_tokens))]
            for i, n in enumerate(names)}


def checkpoint_rows(directory: str | os.PathLike, epoch: int) -> int:
    """Rows of a concept checkpoint on disk (from its ``embed`` file, without a model); a missing file raises
    FileNotFoundError naming it."""
    f = concept_checkpoint_files(directory, epoch)["embed"]
    if not f.is_file():
        raise FileNotFoundError(f"concept checkpoint file not found: {str(f)!r}")
    t = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{f}: expected a [rows, hidden] tensor")
    return int(t.shape[0])


def load_concept_checkpoint(model: ShowoPhi, concept_tokens: ConceptTokens, directory: str | os.PathLike,
                            epoch: int) -> None:
    """Write the rows of ``epoch_N_{embed,lm_head_weight,lm_head_bias}.pt`` into ``concept_tokens.all_ids``.

    Files load with ``torch.load(weights_only=True)``; missing file -> FileNotFoundError, wrong type / shape ->
    ValueError, each naming the file."""
    rows = concept_tokens.all_ids
    k, d = len(rows), model.config.hidden_size
    files = concept_checkpoint_files(directory, epoch)
    want = {"embed": (k, d), "lm_head_weight": (k, d), "lm_head_bias": (k,)}
    loaded: dict[str, torch.Tensor] = {}
    for part, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"concept checkpoint file not found: {str(f)!r}")
        t = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{f}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != want[part]:
            raise ValueError(f"{f}: shape {tuple(t.shape)} but concept {concept_tokens.name!r} needs {want[part]} "
                             f"({k} rows = <c> + {k - 1} tokens, hidden {d})")
        if not torch.isfinite(t).all():
            raise ValueError(f"{f}: contains non-finite values")
        loaded[part] = t
    log.info("%s", checkpoint_line(concept_tokens.name, directory, epoch, k, concept_tokens.all_strs))
    idx = torch.tensor(rows, device=model.device)
    with torch.no_grad():
        model.model.embed_tokens.weight.index_copy_(0, idx, loaded["embed"].to(model.model.embed_tokens.weight))
        model.lm_head.weight.index_copy_(0, idx, loaded["lm_head_weight"].to(model.lm_head.weight))
        model.lm_head.bias.index_copy_(0, idx, loaded["lm_head_bias"].to(model.lm_head.bias))


def save_concept_checkpoint(model: ShowoPhi, concept_tokens: ConceptTokens, directory: str | os.PathLike,
                            epoch: int) -> dict[str, Path]:
    """Save the concept rows in UniCTokens' format (fp32 CPU tensors; each file atomic via tmp + ``os.replace``)."""
    os.makedirs(directory, exist_ok=True)
    idx = torch.tensor(concept_tokens.all_ids, device=model.device)
    tensors = {"embed": model.model.embed_tokens.weight, "lm_head_weight": model.lm_head.weight,
               "lm_head_bias": model.lm_head.bias}
    files = concept_checkpoint_files(directory, epoch)
    for part, f in files.items():
        t = tensors[part].detach().index_select(0, idx).float().cpu().contiguous()
        tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
        torch.save(t, tmp)
        os.replace(tmp, f)
    return files


# ------------------------------------------------------------------------------------------- D1 concept_rows


def freeze(model: nn.Module) -> None:
    """requires_grad = False on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model: nn.Module) -> None:
    """requires_grad = True on every parameter (D1 default: train all weights)."""
    for p in model.parameters():
        p.requires_grad_(True)


@dataclass
class RowRestriction:
    """Handle of :func:`restrict_grads_to_rows`: the trainable rows and their gradient hooks."""

    rows: torch.Tensor
    """long [R] trainable row ids of embed_tokens / lm_head."""
    params: list[nn.Parameter]
    """embed_tokens.weight, lm_head.weight, lm_head.bias (the only parameters with requires_grad)."""
    handles: list
    """Registered gradient hooks (removed by :meth:`remove`)."""

    def remove(self) -> None:
        """Remove the gradient hooks (requires_grad flags are left as they are)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @torch.no_grad()
    def decay_rows_(self, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay on the trainable rows only: ``p[rows] *= 1 - lr * weight_decay``.

        AdamW would decay every row (even rows with zero gradient); use an optimizer with ``weight_decay=0`` on
        these params and call this before each step (:class:`RowDecayAdamW` does both)."""
        if weight_decay:
            for p in self.params:
                p.index_copy_(0, self.rows, p.index_select(0, self.rows) * (1.0 - lr * weight_decay))


def restrict_grads_to_rows(model: ShowoPhi, row_ids) -> RowRestriction:
    """D1 ``concept_rows``: only ``row_ids`` of embed_tokens and lm_head (weight + bias) get gradients.

    Every other parameter gets ``requires_grad=False``; gradient hooks zero the other rows of the three matrices
    (no second copy of a matrix is kept). With AdamW, zero-gradient rows still move by weight decay: use
    :class:`RowDecayAdamW` or :meth:`RowRestriction.decay_rows_` with ``weight_decay=0`` in the optimizer."""
    freeze(model)
    params = [model.model.embed_tokens.weight, model.lm_head.weight, model.lm_head.bias]
    vocab = params[0].shape[0]
    rows = torch.as_tensor(list(row_ids) if not torch.is_tensor(row_ids) else row_ids, dtype=torch.long)
    if rows.numel() == 0 or rows.min() < 0 or rows.max() >= vocab:
        raise ValueError(f"row_ids must be non-empty ids in [0, {vocab}), got {rows.tolist()[:8]}")
    rows = rows.unique().to(params[0].device)
    keep = torch.zeros(vocab, dtype=torch.bool, device=params[0].device)
    keep[rows] = True
    handles = []
    for p in params:
        p.requires_grad_(True)
        m = keep.view(-1, *([1] * (p.dim() - 1)))
        handles.append(p.register_hook(lambda g, m=m: g * m.to(g.dtype)))
    return RowRestriction(rows=rows, params=params, handles=handles)


class RowDecayAdamW(torch.optim.AdamW):
    """AdamW over a :class:`RowRestriction`'s params whose decoupled weight decay touches only the trainable rows.

    Identical to AdamW on those rows (AdamW decays ``p *= 1 - lr*wd`` before the Adam update); the other rows have
    zero gradient, so zero Adam update, and no decay: they stay bit-identical."""

    def __init__(self, restriction: RowRestriction, lr: float = 1e-3, weight_decay: float = 1e-2, **kwargs):
        super().__init__(restriction.params, lr=lr, weight_decay=0.0, **kwargs)
        self.restriction = restriction
        self.row_weight_decay = weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        """Evaluate ``closure`` (if any), decay the rows with the current lr, then the AdamW update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.restriction.decay_rows_(self.param_groups[0]["lr"], self.row_weight_decay)
        super().step()
        return loss
