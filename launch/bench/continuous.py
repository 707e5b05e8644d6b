"""Benchmark: continuous MaskGIT batching against the lock-step engine (part of ``python -m launch.bench.step
--scaling``).

The rollout phase of one step on one actor (in process, the tiny config on CPU, one torch thread, the reward experts
in process): one group of G = 9 in the cluster configs' shards of one sample, DSOG on (screen step and attempt cap
from the config, the threshold calibrated from the group's first attempts as on the first step, so redraws happen).
``lockstep`` runs the shards one after another, each blocking on its screens and rewards (the engine before
continuous batching, what one actor did with one request at a time); ``continuous`` submits them all to one
:class:`~actors.rollout.continuous.ContinuousEngine`. Both produce the same samples (tests/test_continuous.py).

- ``continuous-batching speed-up``: lockstep seconds / continuous seconds;
- ``reward-latency hiding``: the same with every screen and reward call given an injected service time
  (``--service-time``, default 0.25 s: a remote GPU expert's round trip), blocking against asynchronous.

Settings run interleaved (each round a new step's group for all of them); medians.
"""
from __future__ import annotations

import dataclasses
import statistics
import threading
import time

GROUP = 9
"""G of the benchmarked group (paper Table 4)."""


class DelayedScorer:
    """A scorer whose every screen and reward call takes ``delay_s`` more (a remote expert's service time); counts
    the calls running at once (``peak``). A knob of the benchmark and tests only."""

    def __init__(self, base, delay_s: float):
        self.base, self.delay_s = base, float(delay_s)
        self.running = self.peak = 0
        self._lock = threading.Lock()

    def _serve(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.delay_s)
        with self._lock:
            self.running -= 1

    def screen(self, *args):
        """The base scorer's screen scores, after the service time."""
        self._serve()
        return self.base.screen(*args)

    def score(self, *args):
        """The base scorer's rewards, after the service time."""
        self._serve()
        return self.base.score(*args)


def bench_continuous(cfg, repeats: int, service_s: float, log=print) -> dict:
    """Seconds (median) and busy fraction of one step's rollout phase per setting (see the module docstring)."""
    import torch

    from actors.driver.dispatch import shard_group
    from actors.learner.step import concept_specs
    from actors.rollout.continuous import ContinuousEngine
    from actors.rollout.engine import GroupRequest, RolloutEngine
    from actors.rollout.scoring import local_scorer
    from backbone.build import build_policy
    from rl.data.reader import load_dataset

    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, group_size=GROUP))
    ds = load_dataset(cfg.data)
    policy = build_policy(cfg.model, concept_specs(ds))
    policy.model.eval()
    scorer = local_scorer(cfg, ds)
    engines = {0.0: RolloutEngine(cfg, policy, ds, scorer),
               service_s: RolloutEngine(cfg, policy, ds, DelayedScorer(scorer, service_s))}
    concept = sorted(ds.concepts)[0]
    base = GroupRequest(step=0, prompt_index=0, concept=concept, threshold=None)
    threshold = engines[0.0].generate_group(base).init_threshold   # warms up; the first step's calibration
    rc = cfg.rollout

    def lockstep(engine, shards):
        return [engine.generate_samples(sh) for sh in shards]

    def continuous(engine, shards):
        cont = ContinuousEngine(engine, rc.max_batch, rc.max_inflight_calls)
        try:
            return [f.result() for f in [cont.submit(sh) for sh in shards]]
        finally:
            cont.close()

    settings = {"lockstep": (lockstep, 0.0), "continuous": (continuous, 0.0),
                f"lockstep, {service_s:g} s per call": (lockstep, service_s),
                f"continuous, {service_s:g} s per call": (continuous, service_s)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    busy: dict[str, list[float]] = {k: [] for k in settings}
    torch.set_num_threads(1)
    for r in range(repeats):
        req = dataclasses.replace(base, step=r + 1, threshold=threshold)
        shards = shard_group(req, GROUP, 1)
        for name, (run, delay) in settings.items():
            t0 = time.perf_counter()
            results = run(engines[delay], shards)
            times[name].append(time.perf_counter() - t0)
            busy[name].append(sum(x.timings["busy"] for x in results) / sum(x.timings["held"] for x in results))
        log(f"continuous batching round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return {k: {"seconds": statistics.median(v), "busy_fraction": statistics.median(busy[k])}
            for k, v in times.items()}


def render(rows: dict, cfg, service_s: float) -> tuple[str, list[str]]:
    """(Markdown table, figure lines) of :func:`bench_continuous`'s result."""
    d, rc = cfg.dsog, cfg.rollout
    slow_lock, slow_cont = (f"lockstep, {service_s:g} s per call", f"continuous, {service_s:g} s per call")
    lines = [f"Continuous batching: rollout phase of one step on 1 actor, G = {GROUP} in shards of 1 sample, T = "
             f"{cfg.sampler.timesteps}, DSOG at step {d.screen_step} (≤ {d.max_attempts} attempts, calibrated "
             f"threshold), tiny config on CPU in process (1 torch thread, reward experts in process), "
             f"rollout.max_batch {rc.max_batch}, {rc.max_inflight_calls} calls in flight; medians of interleaved "
             "runs. busy = generating seconds / seconds holding work (rollout/busy_fraction).", "",
             "| engine | seconds | busy fraction | speed-up vs lockstep |", "|---|---|---|---|"]
    for name, row in rows.items():
        ref = rows[slow_lock if "per call" in name else "lockstep"]["seconds"]
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['busy_fraction']:.2f} | {ref / row['seconds']:.2f}× |")
    figures = [f"continuous-batching speed-up: {rows['lockstep']['seconds'] / rows['continuous']['seconds']:.2f}×",
               f"reward-latency hiding: {rows[slow_lock]['seconds'] / rows[slow_cont]['seconds']:.2f}×"]
    return "\n".join(lines), figures
