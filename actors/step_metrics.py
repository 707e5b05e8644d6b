"""The per-step metrics record: rewards, advantages, DSOG, learner statistics, phase times, throughput."""
from __future__ import annotations

import numpy as np


def _corr(a: list[float], b: list[float]) -> float:
    """Pearson correlation, NaN when undefined (fewer than 2 points or no spread)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def step_metrics(step: int, results: list, samples: list, learn: dict, dsog, times: dict, dispatcher) -> dict:
    """Everything the issue's metric list asks for, as a flat dict of floats keyed ``section/name``."""
    rewards = np.array([s.reward for s in samples], dtype=np.float64)
    adv = np.array([s.advantage for s in samples], dtype=np.float64)
    m: dict = {"step": step, "reward/total": float(rewards.mean()), "reward/std": float(rewards.std()),
               "adv/std": float(adv.std()), "adv/max_abs": float(np.abs(adv).max())}
    experts = sorted({k for s in samples for k in s.rewards})
    for name in experts:
        vals = [s.rewards[name] for s in samples if name in s.rewards]
        m[f"reward/{name}"] = float(np.mean(vals))
    equal_groups = 0
    for res in results:
        group = [s.reward for s in res.samples]
        equal_groups += int(max(group) - min(group) < 1e-8)
    m["adv/equal_reward_groups"] = equal_groups / max(1, len(results))
    for key, value in learn.items():
        m[f"learn/{key}"] = float(value)
    attempts = [s.attempts for s in samples]
    screened = [x for res in results for x in res.attempt_scores]
    accepted = [x for res in results for x in res.attempt_accepted]
    if screened:
        m["dsog/pass_rate"] = float(np.mean(accepted))
        m["dsog/threshold"] = float(dsog.threshold) if dsog.initialized else float("nan")
        m["dsog/attempts_per_sample"] = float(np.mean(attempts))
        m["dsog/forced_keeps"] = float(sum(r.forced_keeps for r in results))
        m["dsog/screen_reward_corr"] = _corr([s.screen_score for s in samples], [s.reward for s in samples])
    m["prompt/cut_fraction"] = float(np.mean([s.prompt_cut for s in samples]))
    m["prompt/answer_tokens"] = float(np.mean([len(s.answer_ids) for s in samples]))
    for phase in ("answer", "image", "screen", "reward"):
        vals = [r.timings.get(phase, 0.0) for r in results]
        if any(vals):
            m[f"time/{phase}"] = float(sum(vals))
    for key, value in times.items():
        m[f"time/{key}"] = float(value)
    m["throughput/images_per_s"] = len(samples) / max(times.get("step", 0.0), 1e-9)
    m["faults/redispatched_groups"] = float(dispatcher.redispatched)
    dropped = sorted({d for r in results for d in r.dropped})
    m["faults/dropped_experts"] = float(len(dropped))
    return m
