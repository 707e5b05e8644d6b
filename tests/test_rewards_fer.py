"""FER with the real MTCNN (bundled weights) and a seeded random-init InceptionResnetV1.

Honesty note: a random-init FaceNet is not identity-preserving; its embeddings are nearly collapsed (all
cosines ~0.9999), so "same face > different face" holds with a small (~1e-4) but deterministic margin under
the fixed seeds. The alignment itself is checked on pixels, independent of the network.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from rewards.base import ScoreBatch
from rewards.fer import FerConfig, FerExpert


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True)
    return x.clamp(0, 255).round().byte()[0].permute(1, 2, 0).numpy()


ASTRONAUT = skimage.data.astronaut()                       # Eileen Collins, face at ~[181, 62, 268, 172]
CAMERAMAN = np.repeat(skimage.data.camera()[..., None], 3, axis=2)   # a different person, face found by MTCNN
REFERENCE = _resize(ASTRONAUT, 256, 256)                   # small images keep MTCNN fast on 2 shared cores
SAME = _resize(ASTRONAUT[:, ::-1], 200, 200)               # same face, flipped and resized
OTHER = _resize(CAMERAMAN, 200, 200)
NOISE = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: with 2 cores shared by several jobs, multi-threaded kernels stall badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fer():
    e = FerExpert(FerConfig.tiny())
    e.add_reference("eileen", [REFERENCE])
    return e


def test_mtcnn_finds_the_astronaut_face(fer):
    (box, landmarks), = fer.detect([ASTRONAUT])
    np.testing.assert_allclose(box, [181, 62, 268, 172], atol=3)
    assert landmarks.shape == (5, 2) and box[0] < landmarks[:, 0].min() and landmarks[:, 0].max() < box[2]
    assert fer.detect([NOISE]) == [None]


def test_same_face_beats_a_different_face_and_noise_scores_zero(fer):
    before = fer.no_face_count
    batch = ScoreBatch(images=np.stack([SAME, OTHER, NOISE]), concepts=["eileen"] * 3)
    s = fer.score(batch)
    assert s[0] > s[1] > 0.0 and s[2] == 0.0
    assert fer.no_face_count == before + 1
    single = np.concatenate([fer.score(batch.select([i])) for i in range(3)])
    np.testing.assert_allclose(s, single, atol=1e-5)


def test_similarity_alignment_scores_same_face_higher():
    fer = FerExpert(dataclasses.replace(FerConfig.tiny(), align="similarity"))
    fer.add_reference("eileen", [REFERENCE])
    s = fer.score(ScoreBatch(images=np.stack([SAME, OTHER, NOISE]), concepts=["eileen"] * 3))
    assert s[0] > s[1] > 0.0 and s[2] == 0.0


def test_aligned_face_of_mirrored_image_is_the_mirrored_face():
    fer = FerExpert(dataclasses.replace(FerConfig.tiny(), align="similarity"))
    flipped = np.ascontiguousarray(REFERENCE[:, ::-1])
    (b0, p0), (b1, p1), (b2, p2) = fer.detect([REFERENCE, flipped, OTHER])
    f0 = fer.face_tensor(REFERENCE, b0, p0)
    f1 = fer.face_tensor(flipped, b1, p1).flip(-1)
    f2 = fer.face_tensor(OTHER, b2, p2)
    corr = lambda a, b: float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])
    assert corr(f0, f1) > 0.8 and corr(f0, f1) > corr(f0, f2) + 0.2


def test_human_only_and_reference_errors(fer):
    fer.add_reference("rex", [REFERENCE], category="animal")
    with pytest.raises(ValueError, match=r"fer: scores human concepts only; \['rex'\] are \['animal'\]"):
        fer.score(ScoreBatch(images=SAME[None], concepts=["rex"]))
    with pytest.raises(ValueError, match="fer: no reference features for concept.*'bob'"):
        fer.score(ScoreBatch(images=SAME[None], concepts=["bob"]))
    with pytest.raises(ValueError, match="no face detected in any of the 1 reference image.*'ghost'"):
        fer.add_reference("ghost", [NOISE])
    skipped = fer.skipped_references
    fer.add_reference("eileen2", [REFERENCE, NOISE])
    assert fer.skipped_references == skipped + 1 and fer.has_reference("eileen2")


def test_loads_a_vggface2_style_state_dict(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(123)
    src = InceptionResnetV1(pretrained=None, classify=True, num_classes=16)  # has logits.*, as the real file
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(src.state_dict(), path)
    fer = FerExpert(FerConfig(weights_path=str(path)))
    expected = src.state_dict()
    loaded = fer.net.state_dict()
    assert set(expected) - set(loaded) == {"logits.weight", "logits.bias"}
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
    bad = tmp_path / "bad.pt"
    torch.save({"conv2d_1a.conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(FileNotFoundError, match="fer: could not load config field 'weights_path'"):
        FerExpert(FerConfig(weights_path=str(bad)))
