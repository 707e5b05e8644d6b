"""Ensemble: paper weights per category, renormalisation when an optional expert is dropped, NaN errors."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from rewards.base import ExpertConfig, NonFiniteScoreError, RewardExpert, ScoreBatch
from rewards.config import EnsembleConfig
from rewards.ensemble import RewardEnsemble

SCORES = {"tier": np.array([0.5, 1.0, 0.2], np.float32), "ber": np.array([0.3, 0.1, 0.4], np.float32),
          "der": np.array([0.6, 0.9, 0.8], np.float32), "fer": np.array([0.7, 0.0, 0.0], np.float32)}
CATS = ["human", "animal", "object"]


def test_paper_weights_per_category():
    r = RewardEnsemble().combine(SCORES, CATS)
    expected = [0.4 * 0.5 + 0.2 * 0.3 + 0.2 * 0.6 + 0.2 * 0.7,
                0.4 * 1.0 + 0.3 * 0.1 + 0.3 * 0.9,
                0.4 * 0.2 + 0.3 * 0.4 + 0.3 * 0.8]
    np.testing.assert_allclose(r.total, expected, atol=1e-6)
    assert r.total.dtype == np.float32 and not r.notes
    assert set(r.per_expert) == set(SCORES)
    np.testing.assert_allclose(r.weights["fer"], [0.2, 0, 0])
    np.testing.assert_allclose(r.weights["ber"], [0.2, 0.3, 0.3])


def test_dropped_optional_expert_renormalises_and_says_so(caplog):
    scores = {k: v for k, v in SCORES.items() if k != "ber"}
    with caplog.at_level(logging.WARNING):
        r = RewardEnsemble().combine(scores, CATS)
    # human: tier .4, der .2, fer .2 scaled by 1/0.8; animal/object: tier .4, der .3 scaled by 1/0.7
    expected = [(0.4 * 0.5 + 0.2 * 0.6 + 0.2 * 0.7) / 0.8, (0.4 * 1.0 + 0.3 * 0.9) / 0.7, (0.4 * 0.2 + 0.3 * 0.8) / 0.7]
    np.testing.assert_allclose(r.total, expected, atol=1e-6)
    assert len(r.notes) == 3 and all("dropped ['ber']" in n for n in r.notes)
    assert "renormalised" in caplog.text
    for i in range(3):
        assert sum(w[i] for w in r.weights.values()) == pytest.approx(1.0)
    # declared unavailable although scores were passed: same result
    r2 = RewardEnsemble().combine(SCORES, CATS, available={"tier", "der", "fer"})
    np.testing.assert_allclose(r2.total, expected, atol=1e-6)


def test_required_expert_missing_unknown_category_and_shapes_are_errors():
    ens = RewardEnsemble()
    with pytest.raises(ValueError, match=r"required expert\(s\) \['tier'\]"):
        ens.combine({k: v for k, v in SCORES.items() if k != "tier"}, CATS)
    with pytest.raises(ValueError, match="unknown category 'robot'"):
        ens.combine(SCORES, ["human", "robot", "object"])
    with pytest.raises(ValueError, match="scores of 'ber' have shape"):
        ens.combine({**SCORES, "ber": np.zeros(2)}, CATS)
    with pytest.raises(ValueError, match="weights.human.fer"):
        RewardEnsemble(EnsembleConfig(weights={"human": {"tier": 1.0, "fer": -0.1}}))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_from_an_expert_is_an_error(bad):
    with pytest.raises(NonFiniteScoreError, match="expert 'der'"):
        RewardEnsemble().combine({**SCORES, "der": np.array([0.1, bad, 0.2])}, CATS)


class _Recorder(RewardExpert):
    """Scores 1 + index of the sample in the original batch; records which concepts it saw."""

    requires = ("concepts",)

    def __init__(self, name: str):
        self.name = name
        super().__init__(ExpertConfig())
        self.seen: list[list[str]] = []

    def _score(self, batch):
        self.seen.append(list(batch.concepts))
        return np.array([0.1 * (1 + int(c[1:])) for c in batch.concepts])


def test_score_runs_fer_on_humans_only():
    experts = {n: _Recorder(n) for n in ("tier", "ber", "der", "fer")}
    batch = ScoreBatch(concepts=["c0", "c1", "c2"])
    r = RewardEnsemble().score(experts, batch, CATS)
    assert experts["fer"].seen == [["c0"]] and experts["tier"].seen == [["c0", "c1", "c2"]]
    np.testing.assert_allclose(r.per_expert["fer"], [0.1, 0.0, 0.0])
    np.testing.assert_allclose(r.total, [0.1, 0.2, 0.3], atol=1e-6)  # every expert gives the same value
    del experts["ber"]
    r = RewardEnsemble().score(experts, batch, CATS)
    assert len(r.notes) == 3
    np.testing.assert_allclose(r.total, [0.1, 0.2, 0.3], atol=1e-6)
