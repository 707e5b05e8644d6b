"""FER, the Facenet Evaluation Reward: identity similarity of the generated face to the reference faces.

MTCNN (facenet-pytorch, its bundled P/R/O-Net weights) finds the largest face with detection probability
>= ``min_face_prob``; the face is put in a standard position (``align``):

* ``crop`` (default): the box plus a ``margin`` (facenet-pytorch's formula, 32 px as the released code) resized
  to 160×160, the preprocessing the VGGFace2 InceptionResnetV1 weights were trained with;
* ``similarity``: a 5-landmark similarity transform onto the ArcFace template (scaled to 160 px), i.e. the
  paper's "transform them to the standard position" literally.

InceptionResnetV1 (VGGFace2 weights, ``20180402-114759-vggface2.pt`` from a local path, loaded with
``torch.load(weights_only=True)``; the classifier ``logits.*`` is dropped) embeds the faces;
``FER = mean_r cosine(face, reference_face_r)``.

Human concepts only: ``add_reference(concept, images, category=...)`` with a non-human category registers the
concept as not scorable, and scoring it is an error, as is scoring a concept never registered. A generated image
without a detectable face scores 0 and increments ``no_face_count``. Reference images without a face are
skipped (counted in ``skipped_references``); a human concept with no face in any reference is an error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rewards.base import ExpertConfig, RewardExpert, ScoreBatch, cosine, loading, resolve_weights, seeded

__all__ = ["FerConfig", "FerExpert", "ARCFACE_TEMPLATE", "make_detector", "pick_face", "detect_one_by_one",
           "faceless_images"]

log = logging.getLogger(__name__)

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
"""Eyes, nose, mouth corners of the canonical 112×112 ArcFace crop (MTCNN's landmark order)."""


@dataclass
class FerConfig(ExpertConfig):
    """MTCNN + InceptionResnetV1 face-identity expert."""

    weights_path: str | None = None
    """Local InceptionResnetV1 VGGFace2 state dict (.pt/.pth, e.g. 20180402-114759-vggface2.pt); required
    unless random_init is true."""
    align: Literal["crop", "similarity"] = "crop"
    """Face normalisation: box + margin crop (as the weights were trained), or 5-point similarity alignment."""
    image_size: int = 160
    """Side of the aligned face fed to InceptionResnetV1."""
    margin: int = 32
    """Crop margin in output pixels (facenet-pytorch convention; the released code uses 32)."""
    min_face_prob: float = 0.9
    """MTCNN detection probability below which a detection is ignored."""
    min_face_size: int = 20
    """Smallest face MTCNN looks for, in pixels."""

    @classmethod
    def tiny(cls) -> "FerConfig":
        """Real MTCNN, random-init (seeded) InceptionResnetV1."""
        return cls(random_init=True, batch_size=8)


def make_detector(config: FerConfig, device: str = "cpu"):
    """facenet-pytorch's MTCNN (its weights ship with the package) with the expert's detection settings."""
    from facenet_pytorch import MTCNN

    return MTCNN(image_size=config.image_size, margin=config.margin, min_face_size=config.min_face_size,
                 select_largest=True, keep_all=True, device=device)


def pick_face(boxes, probs, points, min_prob: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The largest MTCNN detection with probability >= ``min_prob`` as (box [4], landmarks [5, 2]), or None
    (numpy 2: MTCNN returns object arrays)."""
    if boxes is None:
        return None
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    keep = np.flatnonzero(probs >= min_prob)
    if keep.size == 0:
        return None
    areas = (boxes[keep, 2] - boxes[keep, 0]) * (boxes[keep, 3] - boxes[keep, 1])
    best = keep[int(np.argmax(areas))]
    return boxes[best], points[best]


def detect_one_by_one(detector, images: Sequence[np.ndarray], min_prob: float
                      ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`pick_face` of each image (any sizes), detected one at a time."""
    return [pick_face(*detector.detect(np.ascontiguousarray(img), landmarks=True), min_prob) for img in images]


def faceless_images(images: Sequence[np.ndarray], config: FerConfig, detector=None) -> list[int]:
    """Indices of ``images`` (uint8 HWC) in which MTCNN finds no face under ``config``'s settings: the check the
    driver runs on human concepts' reference photos before any work starts (only the detector is built)."""
    found = detect_one_by_one(detector or make_detector(config), images, config.min_face_prob)
    return [i for i, f in enumerate(found) if f is None]


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2×3 similarity transform (rotation, uniform scale, shift) mapping ``src`` points to ``dst``."""
    u, v = src[:, 0], src[:, 1]
    a = np.concatenate([np.stack([u, -v, np.ones_like(u), np.zeros_like(u)], 1),
                        np.stack([v, u, np.zeros_like(u), np.ones_like(u)], 1)])
    p, *_ = np.linalg.lstsq(a, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    return np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]]])


class FerExpert(RewardExpert):
    """Mean FaceNet cosine of the generated face to the concept's reference faces (humans only)."""

    name = "fer"
    requires = ("images", "concepts")
    uses_references = True

    def __init__(self, config: FerConfig):
        super().__init__(config)
        from facenet_pytorch import InceptionResnetV1

        path = resolve_weights(config.weights_path, "weights_path", self.name, config.random_init, local_only=True)
        with seeded(config.seed):
            net = InceptionResnetV1(pretrained=None, classify=False)
        if not config.random_init:
            with loading(self.name, "weights_path", path):
                state = torch.load(path, map_location="cpu", weights_only=True)
                state = state.get("state_dict", state) if isinstance(state, dict) else state
                net.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")})
        self.net = self.to_model(net)
        self.mtcnn = make_detector(config, self.device)
        self.no_face_count = 0  # generated images scored 0 because no face was found (cumulative)
        self.skipped_references = 0  # reference images without a detectable face (cumulative)
        self._non_human: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------------- faces
    def detect(self, images: Sequence[np.ndarray] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per image: (box [4], landmarks [5,2]) of the largest confident face, or None.

        A ``[B,H,W,3]`` array is detected in micro-batches (MTCNN gives the same boxes batched or not);
        a list of differently sized images one at a time.
        """
        if not (isinstance(images, np.ndarray) and images.ndim == 4):
            return detect_one_by_one(self.mtcnn, images, self.config.min_face_prob)
        raw = []
        for s in self.chunks(len(images)):
            boxes, probs, points = self.mtcnn.detect(np.ascontiguousarray(images[s]), landmarks=True)
            raw.extend(zip(boxes, probs, points))
        return [self._pick_face(*r) for r in raw]

    def _pick_face(self, boxes, probs, points) -> tuple[np.ndarray, np.ndarray] | None:
        """The largest detection with probability >= min_face_prob (:func:`pick_face`)."""
        return pick_face(boxes, probs, points, self.config.min_face_prob)

    def face_tensor(self, img: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
        """The standardised face ``[3, S, S]`` ((x − 127.5) / 128, as facenet expects)."""
        s, m = self.config.image_size, self.config.margin
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
        h, w = img.shape[:2]
        if self.config.align == "crop":
            mx, my = m * (box[2] - box[0]) / (s - m), m * (box[3] - box[1]) / (s - m)
            x0, y0 = int(max(box[0] - mx / 2, 0)), int(max(box[1] - my / 2, 0))
            x1, y1 = int(min(box[2] + mx / 2, w)), int(min(box[3] + my / 2, h))
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
            face = F.interpolate(x[..., y0:y1, x0:x1], size=(s, s), mode="bilinear", antialias=True,
                                 align_corners=False)
        else:
            mat = similarity_matrix(ARCFACE_TEMPLATE * (s / 112.0), landmarks.astype(np.float64))
            jj, ii = np.meshgrid(np.arange(s), np.arange(s))
            pts = np.stack([jj, ii, np.ones_like(jj)], -1) @ mat.T  # output pixel -> image (x, y)
            grid = torch.from_numpy(np.stack([pts[..., 0] / max(w - 1, 1), pts[..., 1] / max(h - 1, 1)], -1) * 2 - 1)
            face = F.grid_sample(x, grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=True)
        return ((face[0].clamp(0, 255) - 127.5) / 128.0)

    def embed(self, faces: list[torch.Tensor]) -> torch.Tensor:
        """float32 embeddings ``[N, 512]`` of standardised faces (micro-batched)."""
        out = [self.net(torch.stack(faces[s]).to(self.device, self.dtype)).float() for s in self.chunks(len(faces))]
        return torch.cat(out) if out else torch.zeros(0, 512)

    def _faces(self, images) -> tuple[list[int], torch.Tensor]:
        """Indices of the images with a face, and those faces' embeddings."""
        found = [(i, d) for i, d in enumerate(self.detect(images)) if d is not None]
        faces = [self.face_tensor(images[i], box, pts) for i, (box, pts) in found]
        return [i for i, _ in found], self.embed(faces)

    # ------------------------------------------------------------------------------------------ contract
    def add_reference(self, concept: str, images: Sequence[np.ndarray], category: str | None = None) -> None:
        """Cache the reference faces of a human concept; ``category`` other than "human" marks the concept as
        not scorable by FER (scoring it is then an error)."""
        if category is not None and category != "human":
            self._non_human[concept] = category
            self._references.pop(concept, None)
            self._reference_digests.pop(concept, None)
            return
        self._non_human.pop(concept, None)
        super().add_reference(concept, images)

    def _reference_features(self, concept: str, images: list[np.ndarray]) -> torch.Tensor:
        idx, emb = self._faces(images)
        if not idx:
            raise ValueError(f"fer: no face detected in any of the {len(images)} reference image(s) of human "
                             f"concept {concept!r}")
        if len(idx) < len(images):
            self.skipped_references += len(images) - len(idx)
            log.warning("fer: %d of %d reference images of %r have no detectable face; skipped",
                        len(images) - len(idx), len(images), concept)
        return emb

    def score(self, batch: ScoreBatch) -> np.ndarray:
        """FER per sample (see the module docstring); non-human concepts are an error."""
        batch.validate()
        non_human = sorted({c for c in batch.concepts or [] if c in self._non_human})
        if non_human:
            raise ValueError(f"fer: scores human concepts only; {non_human} are "
                             f"{[self._non_human[c] for c in non_human]}")
        return super().score(batch)

    def _score(self, batch: ScoreBatch) -> np.ndarray:
        idx, emb = self._faces(batch.images)
        scores = np.zeros(len(batch), dtype=np.float32)
        for row, i in enumerate(idx):
            scores[i] = cosine(emb[row:row + 1], self._references[batch.concepts[i]]).mean().item()
        self.no_face_count += len(batch) - len(idx)
        return scores
