"""The per-step metrics record: rewards, advantages, DSOG, learner statistics, phase times, throughput.

Keys are ``section/name``; :data:`METRIC_DOCS` documents each one (``python -m launch.config_docs --metrics``
prints the table). The same keys go to ``metrics.jsonl``, TensorBoard and the Ray metrics endpoint (as
``ray_grpo_<section>_<name>``).
"""
from __future__ import annotations

import numpy as np

METRIC_DOCS: dict[str, str] = {
    "step": "GRPO step index (0-based; the job log's step N/total is step + 1).",
    "concepts": "The concept(s) the step's prompts trained, comma-separated (text; not exported as a gauge).",
    "reward/total": "Mean ensemble reward of the step's kept samples.",
    "reward/std": "Standard deviation of the ensemble reward over the step's samples.",
    "reward/<expert>": "Mean score of one reward expert (tier, ber, der, fer, clip) over the samples it scored.",
    "adv/std": "Advantage spread: standard deviation of A = R - mean(R_group) over the step's samples.",
    "adv/max_abs": "Largest |advantage| of the step.",
    "adv/equal_reward_groups": "Share of groups whose G rewards are all equal (zero advantage, no learning signal).",
    "learn/loss": "Dr.GRPO loss of the step (D5 normaliser).",
    "learn/kl": "Mean k3 KL to the frozen reference per token.",
    "learn/clip_frac": "Share of tokens whose ratio was clipped (PPO epsilon).",
    "learn/grad_norm": "Global gradient norm before clipping.",
    "learn/logp_mismatch_image": "Mean |learner - rollout| log-prob of the chosen image tokens (D4; with "
                                 "run.overlap: one_step it includes the drift of learn/policy_lag updates).",
    "learn/logp_mismatch_answer": "Mean |learner - rollout| log-prob of the answer IR tokens (D4; see above).",
    "learn/policy_lag": "Updates between the weights that made the step's samples and the learner's (0 on-policy; "
                        "1 with run.overlap: one_step, 0 on its first step).",
    "learn/units_per_rank": "Replay units (forward + backward) per learner rank (D12).",
    "learn/time_s": "Wall seconds of the learner update as seen by the driver.",
    "dsog/pass_rate": "Share of screened attempts that passed the DSOG threshold this step.",
    "dsog/threshold": "DSOG threshold the step's attempts were screened with (NaN while uncalibrated).",
    "dsog/next_threshold": "Threshold after this step's update (used by the next step).",
    "dsog/attempts_per_sample": "Mean attempts per kept sample.",
    "dsog/forced_keeps": "Samples kept at the attempt cap although below the threshold.",
    "dsog/screen_reward_corr": "Pearson correlation of the kept samples' screen score and final reward.",
    "prompt/cut_fraction": "Share of compound prompts whose IR was cut to fit the 128-token text block (D9).",
    "prompt/answer_tokens": "Mean length of the sampled answer IR in tokens.",
    "time/rollout": "Wall seconds of the rollout phase (answers, MaskGIT, screen, rewards; all groups); with "
                    "run.overlap: one_step, of the rollouts run in this step (the next step's, beside the update).",
    "time/answer": "Actor-seconds generating answers, summed over groups.",
    "time/image": "Actor-seconds of MaskGIT generation (screen excluded), summed over groups.",
    "time/screen": "Seconds of DSOG screening calls, summed over groups (waited for in lock-step, in the background "
                   "with rollout.engine: continuous).",
    "time/reward": "Seconds of reward scoring calls, summed over groups (waited for in lock-step, in the background "
                   "with rollout.engine: continuous).",
    "rollout/busy_fraction": "Rollout actors' generating seconds (answers, MaskGIT, decoding) over the seconds they "
                             "held work, summed over actors: below 1 by the time they waited on screen / reward "
                             "calls (rollout.engine: lockstep waits on every call; continuous only when nothing is "
                             "left to step).",
    "time/learn": "Wall seconds of the learner update (with run.overlap: one_step, from its start to its end, the "
                  "overlapped rollout included).",
    "time/sync": "Wall seconds of the learner -> rollout weight sync.",
    "time/step": "Wall seconds of the whole step.",
    "sync/seconds": "Seconds learner rank 0 spent broadcasting weights.",
    "throughput/images": "Kept images (samples) of the step.",
    "throughput/images_per_s": "Kept images per wall second of the step.",
    "faults/redispatched_groups": "Groups re-dispatched after a rollout actor failure (cumulative over the run).",
    "faults/dropped_experts": "Optional reward experts dropped this step (their weight renormalised away).",
    "faults/reward_failures": "Failed reward-server attempts this step (retried or dropped), all experts, counted by "
                              "the client that saw them.",
    "faults/reward_replicas_lost": "Reward replicas that died this step (SIGKILL, crash, OOM kill, lost node; read "
                                   "from the GCS), also those whose requests Serve re-routed so no client saw an "
                                   "error. Not part of faults/reward_failures: each failure is counted once.",
}


def _corr(a: list[float], b: list[float]) -> float:
    """Pearson correlation, NaN when undefined (fewer than 2 points or no spread)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def step_metrics(step: int, results: list, samples: list, learn: dict, dsog, times: dict, dispatcher,
                 threshold_used: float | None = None, experts: list[str] | tuple = (),
                 replicas_lost: float = 0.0) -> dict:
    """Everything the issue's metric list asks for, as a flat dict of floats keyed ``section/name``.

    ``results``: the step's GroupResults; ``samples``: their samples with advantages; ``learn``: the learner's
    metrics; ``dsog``: the controller after this step's update; ``times``: wall seconds per driver phase;
    ``threshold_used``: the threshold the step's requests carried (None = uncalibrated); ``experts``: the enabled
    reward experts; each gets a ``reward/<expert>`` key every step (NaN when it scored no sample, e.g. FER on a
    step without a human concept), so every series exists from the first step."""
    rewards = np.array([s.reward for s in samples], dtype=np.float64)
    adv = np.array([s.advantage for s in samples], dtype=np.float64)
    m: dict = {"step": int(step), "reward/total": float(rewards.mean()), "reward/std": float(rewards.std()),
               "adv/std": float(adv.std()), "adv/max_abs": float(np.abs(adv).max())}
    m["concepts"] = ",".join(sorted({str(s.concept) for s in samples}))
    for name in sorted({k for s in samples for k in s.rewards} | set(experts)):
        scored = [s.rewards[name] for s in samples if name in s.rewards]
        m[f"reward/{name}"] = float(np.mean(scored)) if scored else float("nan")
    equal = [max(g) - min(g) < 1e-8 for g in ([s.reward for s in r.samples] for r in results) if g]
    m["adv/equal_reward_groups"] = float(np.mean(equal)) if equal else float("nan")
    for key, value in learn.items():
        m[f"learn/{key}"] = float(value)
    screened = [x for r in results for x in r.attempt_scores]
    if screened:
        accepted = [x for r in results for x in r.attempt_accepted]
        m["dsog/pass_rate"] = float(np.mean(accepted))
        if threshold_used is None:  # the first step calibrates: report the threshold it set
            inits = [r.init_threshold for r in results if r.init_threshold is not None]
            threshold_used = inits[0] if inits else None
        m["dsog/threshold"] = float("nan") if threshold_used is None else float(threshold_used)
        m["dsog/next_threshold"] = float(dsog.threshold) if dsog.initialized else float("nan")
        m["dsog/attempts_per_sample"] = float(np.mean([s.attempts for s in samples]))
        m["dsog/forced_keeps"] = float(sum(r.forced_keeps for r in results))
        m["dsog/screen_reward_corr"] = _corr([s.screen_score for s in samples], [s.reward for s in samples])
    m["prompt/cut_fraction"] = float(np.mean([s.prompt_cut for s in samples]))
    m["prompt/answer_tokens"] = float(np.mean([len(s.answer_ids) for s in samples]))
    for phase in ("answer", "image", "screen", "reward"):
        m[f"time/{phase}"] = float(sum(r.timings.get(phase, 0.0) for r in results))
    for key, value in times.items():
        m[f"time/{key}"] = float(value)
    held = sum(r.timings.get("held", 0.0) for r in results)
    m["rollout/busy_fraction"] = (sum(r.timings.get("busy", 0.0) for r in results) / held if held > 0
                                  else float("nan"))
    m["throughput/images"] = float(len(samples))
    m["throughput/images_per_s"] = len(samples) / max(times.get("step", 0.0), 1e-9)
    m["faults/redispatched_groups"] = float(getattr(dispatcher, "redispatched", 0))
    m["faults/dropped_experts"] = float(len({d for r in results for d in r.dropped}))
    m["faults/reward_failures"] = float(sum(sum(r.reward_failures.values()) for r in results))
    m["faults/reward_replicas_lost"] = float(replicas_lost)
    return m


def metric_doc(key: str) -> str:
    """The description of a metric key (``reward/<expert>`` and ``learn/*`` fall back to generic text)."""
    if key in METRIC_DOCS:
        return METRIC_DOCS[key]
    section = key.split("/", 1)[0]
    if section == "reward":
        return METRIC_DOCS["reward/<expert>"]
    return f"GRPO metric {key}"
