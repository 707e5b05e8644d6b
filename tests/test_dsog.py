"""DSOG threshold controller: convergence on score streams of different scales, attempt cap, checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rl.grpo.config import DSOGConfig
from rl.grpo.dsog import AttemptBatch, AttemptLoop, DSOGController, select_attempt

G = 9  # samples per batch


def simulate(ctrl: DSOGController, draw, batches: int, seed: int = 0) -> list[float]:
    """Run `batches` rollout batches of G samples through the attempt loop; return per-batch pass rates."""
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(batches):
        results = []
        for _ in range(G):
            loop = ctrl.attempt_loop()
            res = None
            while res is None:
                res = loop.offer(draw(rng))
            assert res.attempts <= ctrl.cfg.max_attempts
            results.append(res)
        m = ctrl.observe_results(results)
        rates.append(m["pass_rate"])
    return rates


STREAMS = {
    "uniform01": lambda r: r.uniform(0.0, 1.0),
    "normal_0.3_sd0.02": lambda r: r.normal(0.3, 0.02),
    "uniform_x100": lambda r: 100.0 * r.uniform(0.0, 1.0),
    "negative": lambda r: r.normal(-3.0, 0.5),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_converges_to_target_pass_rate(name):
    ctrl = DSOGController(DSOGConfig())
    rates = simulate(ctrl, STREAMS[name], batches=400)
    assert rates[0] == 1.0  # uncalibrated first batch lets everything through
    assert ctrl.threshold is not None and math.isfinite(ctrl.threshold)
    late = float(np.mean(rates[150:]))
    assert abs(late - 0.25) < 0.05, (name, late, ctrl.metrics())


def test_first_batch_quantile_init():
    ctrl = DSOGController()
    scores = np.linspace(0.0, 1.0, 101)
    ctrl.observe_batch(scores, np.ones(101, bool))
    assert ctrl.threshold == pytest.approx(0.75)


def test_recovers_from_bad_initial_threshold():
    # threshold far too high for uniform [0,1] scores: pass rate starts near 0 and must come back
    ctrl = DSOGController(DSOGConfig(initial_threshold=0.97))
    rates = simulate(ctrl, STREAMS["uniform01"], batches=400, seed=1)
    assert np.mean(rates[:10]) < 0.15
    assert abs(np.mean(rates[200:]) - 0.25) < 0.06
    assert 0.6 < ctrl.threshold < 0.9


def test_raw_space_falls_back_outside_unit_interval():
    ctrl = DSOGController(DSOGConfig(space="raw"))
    rates = simulate(ctrl, STREAMS["uniform_x100"], batches=300, seed=2)
    assert ctrl.fallbacks > 0
    assert abs(np.mean(rates[100:]) - 0.25) < 0.06
    # on [0,1] scores raw mode is the paper's rule, no fallback
    ctrl = DSOGController(DSOGConfig(space="raw"))
    simulate(ctrl, STREAMS["uniform01"], batches=100, seed=3)
    assert ctrl.fallbacks == 0


def test_momentum_rule_direction_and_formula():
    c = DSOGConfig(space="raw", initial_threshold=0.5)
    ctrl = DSOGController(c)
    ctrl.observe_batch([0.1, 0.2, 0.3, 0.4], [False] * 4, forced=1)  # PR = 0 -> threshold goes down
    p = 0.5 ** (1 + 0.12 * 0.25)
    assert ctrl.threshold == pytest.approx(0.5 + 0.2 * (p - 0.5))
    ctrl2 = DSOGController(c)
    ctrl2.observe_batch([0.6, 0.7, 0.8, 0.9], [True] * 4)  # PR = 1 -> threshold goes up
    assert ctrl2.threshold > 0.5


def test_step_rule_released_code():
    c = DSOGConfig.released_code()
    ctrl = DSOGController(c)
    assert ctrl.threshold == 0.5 and c.scorer == "clip"
    ctrl.observe_batch([0.1] * 8, [False] * 8, forced=2)
    assert ctrl.threshold == pytest.approx(0.495)
    ctrl.observe_batch([0.9] * 8, [True] * 8)
    ctrl.observe_batch([0.9] * 8, [True] * 8)
    assert ctrl.threshold == pytest.approx(0.505)
    # small deviations from TPR do not move it
    ctrl.observe_batch([0.5] * 4, [True, False, False, False])
    assert ctrl.threshold == pytest.approx(0.505)
    rates = simulate(DSOGController(c), STREAMS["uniform01"], batches=300, seed=4)
    assert abs(np.mean(rates[150:]) - 0.25) < 0.08


def test_nothing_passes_ends_at_cap_never_loops():
    ctrl = DSOGController(DSOGConfig(initial_threshold=1e9, max_attempts=4))
    loop = ctrl.attempt_loop()
    out = [loop.offer(s) for s in (0.3, 0.9, 0.1, 0.5)]
    assert out[:3] == [None, None, None]
    res = out[3]
    assert res.forced and res.kept_index == 1 and res.attempts == 4 and res.kept_score == 0.9
    with pytest.raises(RuntimeError):
        loop.offer(1.0)
    # the whole stream of never-passing scores: bounded work, all forced
    rates = simulate(ctrl, lambda r: r.uniform(0, 1), batches=3)
    assert rates[0] == 0.0
    assert ctrl.metrics()["forced_keeps"] == G and ctrl.metrics()["attempts_per_kept"] == 4


def test_select_attempt_first_passing_and_errors():
    r = select_attempt([0.1, 0.6, 0.9], threshold=0.5, max_attempts=4)
    assert (r.kept_index, r.forced, r.attempts, r.passed) == (1, False, 2, [False, True])
    with pytest.raises(ValueError, match="more attempts"):
        select_attempt([0.1, 0.2], threshold=0.5, max_attempts=4)
    with pytest.raises(ValueError, match="finite"):
        select_attempt([float("nan")], threshold=0.5, max_attempts=4)
    assert select_attempt([0.0], threshold=None, max_attempts=4).kept_index == 0
    assert AttemptLoop(None, 1).offer(-5.0).forced is False


def test_disabled_accepts_first_attempt():
    ctrl = DSOGController(DSOGConfig(enabled=False))
    simulate(ctrl, STREAMS["uniform01"], batches=3)
    assert ctrl.threshold is None and ctrl.decide(-1e9)
    assert ctrl.metrics()["attempts_per_kept"] == 1.0


def test_state_dict_roundtrip_continues_identically():
    a = DSOGController()
    simulate(a, STREAMS["normal_0.3_sd0.02"], batches=20, seed=5)
    b = DSOGController()
    b.load_state_dict(a.state_dict())
    ra = simulate(a, STREAMS["normal_0.3_sd0.02"], batches=10, seed=6)
    rb = simulate(b, STREAMS["normal_0.3_sd0.02"], batches=10, seed=6)
    assert ra == rb and a.threshold == b.threshold
    with pytest.raises(ValueError, match="velocity"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "velocity"})


def test_config_validation_and_tiny():
    with pytest.raises(ValueError, match="rule"):
        DSOGConfig(rule="x")
    with pytest.raises(ValueError, match="scorer"):
        DSOGConfig(scorer="blip3")
    t = DSOGConfig.tiny()
    assert t.screen_step < DSOGConfig().screen_step


def test_explicit_initialization_api():
    c = DSOGConfig()
    assert DSOGController.initial_threshold(np.linspace(0, 1, 101), c) == pytest.approx(0.75)
    assert DSOGController.initial_threshold([1.0], DSOGConfig(initial_threshold=0.3)) == 0.3
    ctrl = DSOGController(c)
    assert not ctrl.initialized
    ctrl.initialize(0.6)
    assert ctrl.initialized and ctrl.threshold == 0.6
    ctrl.observe_batch([0.1, 0.2], [False, False])  # already initialised: the rule applies (goes down)
    assert ctrl.threshold < 0.6


def _run_batch(batch: AttemptBatch, rounds):
    """Offer scripted per-round scores (one per pending sample) until the batch is done; returns what ended each
    round."""
    ended = []
    for scores in rounds:
        assert len(scores) == len(batch.pending)
        ended.append(batch.offer(scores))
        if batch.done:
            return ended
    raise AssertionError("scripted rounds ran out")


def test_attempt_batch_rounds_forced_ties_and_resume_plan():
    """Round by round over 4 samples: passes leave, the rest are redrawn as a smaller batch; at the cap the first
    best-screened attempt is kept (a tie keeps the earlier one); every sample's decision is select_attempt's."""
    b = AttemptBatch(4, threshold=0.5, max_attempts=3)
    assert b.round == 0 and b.pending == [0, 1, 2, 3]
    ended = _run_batch(b, [[0.2, 0.9, 0.4, 0.1], [0.6, 0.4, 0.3], [0.4, 0.05]])
    assert ended == [[1], [0], [2, 3]] and b.round == 3 and b.members == [[0, 1, 2, 3], [0, 2, 3], [2, 3]]
    assert b.scores == [0.2, 0.9, 0.4, 0.1, 0.6, 0.4, 0.3, 0.4, 0.05]
    assert b.passed == [False, True, False, False, True, False, False, False, False]
    res = b.results
    assert [(r.kept_index, r.forced, r.attempts) for r in res] == [(1, False, 2), (0, False, 1), (0, True, 3),
                                                                    (1, True, 3)]
    per_sample = {0: [0.2, 0.6], 1: [0.9], 2: [0.4, 0.4, 0.4], 3: [0.1, 0.3, 0.05]}
    for i, scores in per_sample.items():
        assert select_attempt(scores, 0.5, 3) == res[i]          # the one rule, sample by sample
    assert b.forced == 2 and b.init_threshold is None
    # passed attempts by (round, sample), then forced keeps by sample; rows are positions in the drawing round
    assert b.resume_plan() == [(0, [(1, 1), (2, 2)]), (1, [(0, 0), (3, 2)])]
    assert b.live_rounds() == {0, 1}
    with pytest.raises(RuntimeError, match="already ended"):
        b.offer([0.1])


def test_attempt_batch_first_round_calibrates_and_is_judged():
    """No threshold + ``calibrate``: the first round's scores set T₀ (the (1 − TPR) quantile) and that round is
    screened against it, as the rollout engine has always done on the first step: only ~TPR of the first attempts
    pass, not all of them (the divergence a bare uncalibrated AttemptLoop would hide)."""
    cfg = DSOGConfig(max_attempts=2)
    first = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    b = AttemptBatch(8, threshold=None, max_attempts=2, calibrate=cfg)
    ended = b.offer(first)
    t0 = DSOGController.initial_threshold(first, cfg)
    assert b.init_threshold == t0 == b.threshold and 0.6 < t0 < 0.7
    assert ended == [6, 7] and b.passed == [s > t0 for s in first]
    b.offer([0.9, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert b.done and b.forced == 5 and [r.attempts for r in b.results] == [2] * 6 + [1, 1]
    # a fixed initial threshold is used as is; without calibrate every first attempt passes
    assert AttemptBatch(2, None, 2, calibrate=DSOGConfig(initial_threshold=0.15)).offer([0.1, 0.2]) == [1]
    plain = AttemptBatch(3, None, 4)
    assert plain.offer([-5.0, 0.0, 3.0]) == [0, 1, 2] and plain.init_threshold is None and plain.forced == 0


def test_attempt_batch_live_rounds_track_the_best_and_input_checks():
    """Only rounds holding a kept (or at-the-cap-kept) attempt stay live; wrong lengths and NaN scores raise."""
    b = AttemptBatch(2, threshold=0.9, max_attempts=3)
    b.offer([0.5, 0.1])
    assert b.live_rounds() == {0}
    b.offer([0.4, 0.3])                 # sample 1's best moves to round 1, sample 0's stays in round 0
    assert b.live_rounds() == {0, 1}
    b.offer([0.95, 0.2])                # sample 0 passes in round 2, sample 1 is forced with its round-1 attempt
    assert b.live_rounds() == {1, 2} and b.resume_plan() == [(2, [(0, 0)]), (1, [(1, 1)])]
    with pytest.raises(ValueError, match="2 pending"):
        AttemptBatch(2, 0.5, 2).offer([0.1])
    with pytest.raises(ValueError, match="finite"):
        AttemptBatch(2, 0.5, 2).offer([0.1, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        AttemptBatch(2, None, 2, calibrate=DSOGConfig()).offer([0.1, float("inf")])
    with pytest.raises(RuntimeError, match="pending"):
        AttemptBatch(2, 0.5, 2).results
