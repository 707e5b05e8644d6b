"""Initial values of the concept rows for UniCTokens concept injection (stages 1–3, joint).

Each group of rows is initialised right before the first stage that trains it (see ``rl/inject/loop.py``):

* ``<c>``: the mean of the class word's token rows (``embed``, ``lm_head`` weight and bias), done by
  ``backbone.concepts.add_concept_tokens`` when the policy is built (UniCTokens stage 1).
* understanding tokens (stage 1, ``--init_by_images``): k-means (k = number of tokens, sklearn ``KMeans``,
  ``random_state`` = seed) over the embedding rows of the image-code ids of the concept's training images (every
  token occurrence of every image, so frequent codes weigh more). Each token row is the **mean of its cluster's
  image-token rows** (one exact M-step on sklearn's final labels, so the row is a convex combination of image-token
  rows); the ``lm_head`` weight / bias rows are the means of the same members' ``lm_head`` rows (Show-o's lm_head is
  untied, the lm_head rows of the image codes live in their own space).
* generation tokens (stage 2): with a face model (human concepts): the mean FaceNet embedding (512-d) of the
  concept's training faces, viewed as ``[n, 512/n]`` (``[8, 64]``) and linearly interpolated to ``[n, hidden]``
  (UniCTokens uses InsightFace antelopev2; FaceNet is the service's face model, ``rewards/fer.py``). FaceNet
  embeddings are unit-norm while embedding rows are not, so the rows are rescaled to the mean L2 norm of the
  understanding rows. Only the embedding rows come from the face; the lm_head rows use the fallback below.
  Fallback (no face model, a non-human concept, or no face found): **mean of the understanding rows + noise**,
  ``row_i = mean(U) + noise_scale · std(U) · N(0, 1)`` per element, from ``torch.Generator(seed)`` (deterministic;
  distinct rows; the same for embed, lm_head weight and bias).
* stage-3 tokens: the same fallback, from the understanding rows as trained so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewards.fer import FerConfig

__all__ = ["InitConfig", "InitRows", "read_rows", "write_rows", "kmeans_labels", "kmeans_token_init",
           "derived_token_init", "face_token_init", "facenet_mean_embedding", "FACE_DIM"]

FACE_DIM = 512
"""Size of a FaceNet (InceptionResnetV1) embedding."""


@dataclass
class InitConfig:
    """Initialisation of the concept rows (see ``rl/inject/initial_rows.py``)."""

    kmeans_seed: int = 0
    """random_state of sklearn KMeans for the understanding tokens (UniCTokens: 0)."""
    noise_scale: float = 0.1
    """Generation / stage-3 fallback init: mean(understanding rows) + noise_scale·std·N(0,1)."""
    face: FerConfig | None = None
    """FaceNet (``rewards.fer.FerConfig``: weights_path, device, ...) for the generation-token face init of human
    concepts; None = always the fallback init."""


@dataclass
class InitRows:
    """Values for some concept rows: ``embed`` / ``lm_head_weight`` ``[k, hidden]``, ``lm_head_bias`` ``[k]``."""

    embed: torch.Tensor
    """float32 [k, hidden] embedding rows."""
    lm_head_weight: torch.Tensor
    """float32 [k, hidden] lm_head weight rows."""
    lm_head_bias: torch.Tensor
    """float32 [k] lm_head bias entries."""

    def __len__(self) -> int:
        return self.embed.shape[0]


def _params(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return model.model.embed_tokens.weight, model.lm_head.weight, model.lm_head.bias


@torch.no_grad()
def read_rows(model, row_ids: Sequence[int]) -> InitRows:
    """The current values of ``row_ids`` (float32, CPU copies)."""
    idx = torch.as_tensor(list(row_ids), dtype=torch.long)
    e, w, b = (p.detach().index_select(0, idx.to(p.device)).float().cpu() for p in _params(model))
    return InitRows(e, w, b)


@torch.no_grad()
def write_rows(model, row_ids: Sequence[int], rows: InitRows) -> None:
    """Write ``rows`` into ``row_ids`` of embed_tokens / lm_head (cast to the model's dtype and device)."""
    ids = list(row_ids)
    if len(ids) != len(rows):
        raise ValueError(f"write_rows: {len(ids)} row ids but {len(rows)} rows")
    for p, v in zip(_params(model), (rows.embed, rows.lm_head_weight, rows.lm_head_bias)):
        if tuple(v.shape[1:]) != tuple(p.shape[1:]):
            raise ValueError(f"write_rows: rows of shape {tuple(v.shape)} do not fit a parameter of shape "
                             f"{tuple(p.shape)}")
        p.index_copy_(0, torch.as_tensor(ids, dtype=torch.long, device=p.device), v.to(p))


def kmeans_labels(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """sklearn ``KMeans(n_clusters=k, random_state=seed)`` labels of ``points [M, d]`` (float64)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, random_state=seed, n_init="auto")
    return km.fit_predict(np.asarray(points, dtype=np.float64)).astype(np.int64)


@torch.no_grad()
def kmeans_token_init(model, image_offset: int, codes: torch.Tensor, k: int, seed: int = 0,
                      concept: str = "?") -> InitRows:
    """k rows from k-means over the embedding rows of the image-code ids ``codes`` (any shape, code ids 0..K-1).

    Clusters are computed on the embedding rows of every occurrence; each output row (embed, lm_head weight,
    lm_head bias) is the mean of the corresponding rows of its cluster's members. ValueError (naming ``concept``)
    when the images hold fewer than ``k`` distinct codes (k distinct rows are impossible)."""
    codes = torch.as_tensor(codes).reshape(-1).long().cpu()
    distinct = int(codes.unique().numel())
    if distinct < k:
        raise ValueError(f"concept {concept!r}: k-means init needs >= {k} distinct image codes in the training "
                         f"images, found {distinct} (add images or lower model.num_understanding_tokens)")
    rows = codes + image_offset
    src = read_rows(model, rows.tolist())
    labels = torch.from_numpy(kmeans_labels(src.embed.double().numpy(), k, seed))
    onehot = F.one_hot(labels, k).double()                       # [M, k]
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError(f"concept {concept!r}: k-means produced an empty cluster")
    mean = lambda x: ((onehot.T @ x.double().reshape(len(labels), -1)) / counts[:, None]).float()  # noqa: E731
    return InitRows(embed=mean(src.embed), lm_head_weight=mean(src.lm_head_weight),
                    lm_head_bias=mean(src.lm_head_bias).reshape(k))


def derived_token_init(base: InitRows, n: int, noise_scale: float = 0.1, seed: int = 0) -> InitRows:
    """``n`` rows = mean(base) + noise_scale · std(base) · N(0, 1) (per element, ``torch.Generator(seed)``)."""
    gen = torch.Generator().manual_seed(int(seed))

    def one(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        std = x.std(0) if x.shape[0] > 1 else torch.zeros_like(x[0])
        noise = torch.randn((n, *x.shape[1:]), generator=gen, dtype=torch.float32)
        return x.mean(0).expand(n, *x.shape[1:]) + noise_scale * std * noise

    return InitRows(embed=one(base.embed), lm_head_weight=one(base.lm_head_weight), lm_head_bias=one(base.lm_head_bias))


def face_token_init(face_embedding: torch.Tensor, n: int, hidden: int, fallback: InitRows,
                    target_norm: float | None = None) -> InitRows:
    """Embedding rows from a mean face embedding ``[512]``: view ``[n, 512/n]``, linear interpolation to
    ``[n, hidden]`` (UniCTokens' rule), optionally rescaled so each row has L2 norm ``target_norm``. lm_head rows
    are taken from ``fallback``."""
    f = torch.as_tensor(face_embedding).float().reshape(-1)
    if f.numel() % n:
        raise ValueError(f"face init: a {f.numel()}-d face embedding cannot be viewed as {n} rows")
    rows = F.interpolate(f.view(1, n, f.numel() // n), size=hidden, mode="linear", align_corners=False)[0]
    if target_norm is not None:
        rows = rows * (target_norm / rows.norm(dim=1, keepdim=True).clamp(min=1e-12))
    if len(fallback) != n:
        raise ValueError(f"face init: fallback has {len(fallback)} rows, need {n}")
    return InitRows(embed=rows, lm_head_weight=fallback.lm_head_weight.clone(),
                    lm_head_bias=fallback.lm_head_bias.clone())


@torch.no_grad()
def facenet_mean_embedding(fer_config, images: Sequence[np.ndarray]) -> torch.Tensor | None:
    """Mean FaceNet embedding ``[512]`` of the faces found in ``images`` (``rewards.fer.FerExpert`` built from
    ``fer_config``), or None when no face is found."""
    from rewards.fer import FerExpert

    expert = FerExpert(fer_config)
    images = [np.ascontiguousarray(im) for im in images]
    found = [(im, d) for im, d in zip(images, expert.detect(images)) if d is not None]
    if not found:
        return None
    emb = expert.embed([expert.face_tensor(im, box, pts) for im, (box, pts) in found])
    return emb.float().mean(0).cpu()


FaceEmbedder = Callable[[Sequence[np.ndarray]], "torch.Tensor | None"]
"""images -> mean face embedding [512] or None (e.g. ``functools.partial(facenet_mean_embedding, fer_config)``)."""
