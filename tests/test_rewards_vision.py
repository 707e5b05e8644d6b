"""BER, DER and CLIP through the real classes on tiny random-init (seeded) configs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rewards.base import ScoreBatch
from rewards.registry import build_expert, config_class

TEXTS = ["a photo of a dog", "a dog on the beach at sunset, wearing a red scarf", "cat", "x", "a b c d e f g"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: with 2 cores shared by several jobs, multi-threaded kernels stall badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(b=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, 48, 64, 3), dtype=np.uint8)


def _refs(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)]


@pytest.fixture(scope="module", params=["ber", "der", "clip"])
def expert(request):
    e = build_expert(request.param, "tiny")
    e.add_reference("dog", _refs(1))
    e.add_reference("cat", _refs(2))
    return e


def _batch():
    return ScoreBatch(images=_images(), texts=TEXTS, concepts=["dog", "cat", "dog", "dog", "cat"])


def test_batched_equals_one_at_a_time(expert):
    batch = _batch()
    full = expert.score(batch)
    assert full.dtype == np.float32 and full.shape == (5,) and np.all(np.isfinite(full))
    single = np.concatenate([expert.score(batch.select([i])) for i in range(len(batch))])
    np.testing.assert_allclose(full, single, atol=1e-5)
    assert np.all(np.abs(full) <= 1 + 1e-5)  # cosines (CLIP: a convex mix of cosines)


def test_seeded_random_init_is_reproducible(expert):
    again = build_expert(expert.name, "tiny")
    for concept, seed in (("dog", 1), ("cat", 2)):
        again.add_reference(concept, _refs(seed))
    np.testing.assert_allclose(again.score(_batch()), expert.score(_batch()), atol=1e-6)
    other = build_expert(expert.name, dataclasses.replace(config_class(expert.name).tiny(), seed=7))
    for concept, seed in (("dog", 1), ("cat", 2)):
        other.add_reference(concept, _refs(seed))
    assert not np.allclose(other.score(_batch()), expert.score(_batch()), atol=1e-4)


def test_references_are_cached_and_required(expert):
    if not expert.uses_references:
        expert.add_reference("ignored", _refs())  # accepted, no-op
        assert not expert.has_reference("ignored")
        return
    calls = []
    orig = expert._reference_features
    expert._reference_features = lambda c, imgs: calls.append(c) or orig(c, imgs)
    try:
        expert.add_reference("dog", _refs(1))  # same images: cached
        assert calls == []
        expert.add_reference("dog2", _refs(3))
        assert calls == ["dog2"]
    finally:
        del expert._reference_features
    with pytest.raises(ValueError, match=f"{expert.name}: no reference features for concept.*'wolf'"):
        expert.score(ScoreBatch(images=_images(1), texts=["a"], concepts=["wolf"]))


def test_required_fields_named(expert):
    with pytest.raises(ValueError, match=f"{expert.name}: ScoreBatch field"):
        expert.score(ScoreBatch(images=_images(2)))


def test_der_reference_similarity_orders_images():
    der = build_expert("der", "tiny")
    refs = _refs(1)
    der.add_reference("dog", refs)
    same = np.stack([refs[0], refs[0][::-1]])
    noise = np.random.default_rng(9).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    s_same = der.score(ScoreBatch(images=same, concepts=["dog", "dog"]))
    s_noise = der.score(ScoreBatch(images=noise, concepts=["dog", "dog"]))
    assert s_same[0] > s_noise.max()
    patch = build_expert("der", dataclasses.replace(config_class("der").tiny(), pooling="patch_mean"))
    patch.add_reference("dog", refs)
    assert not np.allclose(patch.score(ScoreBatch(images=same, concepts=["dog"] * 2)), s_same)


def test_clip_components_and_screen_mix():
    clip = build_expert("clip", "tiny")
    clip.add_reference("dog", _refs(1))
    imgs = _images(3)
    i = clip.clip_image_scores(imgs, ["dog"] * 3)
    t = clip.clip_text_scores(imgs, TEXTS[:3])
    s = clip.score(ScoreBatch(images=imgs, texts=TEXTS[:3], concepts=["dog"] * 3))
    np.testing.assert_allclose(s, 0.65 * i + 0.35 * t, atol=1e-6)
    image_only = build_expert("clip", dataclasses.replace(config_class("clip").tiny(), text_weight=0.0))
    image_only.add_reference("dog", _refs(1))
    np.testing.assert_allclose(image_only.score(ScoreBatch(images=imgs, concepts=["dog"] * 3)), 0.65 * i, atol=1e-6)
    with pytest.raises(ValueError, match="clip: 2 texts for 3 images"):
        clip.clip_text_scores(imgs, TEXTS[:2])


def test_ber_text_matters():
    ber = build_expert("ber", "tiny")
    img = _images(1)
    a = ber.score(ScoreBatch(images=img, texts=["a dog"]))
    b = ber.score(ScoreBatch(images=img, texts=["an entirely different long sentence about finance"]))
    assert a[0] != pytest.approx(b[0], abs=1e-6)
