"""Metrics outputs: JSONL + TensorBoard + terminal line, the pictures, and Ray metrics on the Prometheus endpoint."""
from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from actors.telemetry.logger import MetricsLogger, read_metrics
from actors.telemetry.pictures import display_prompt, save_image_grid, save_reward_curves
from actors.telemetry.prometheus import metric_name
from actors.telemetry.step_metrics import METRIC_DOCS, metric_doc, step_metrics

METRICS = {"step": 0, "reward/total": 0.5, "reward/der": 0.7, "reward/std": 0.1, "adv/std": 0.05,
           "learn/loss": -1e-3, "learn/kl": 2e-4, "learn/grad_norm": 0.3, "dsog/pass_rate": 0.25,
           "dsog/threshold": float("nan"), "time/step": 1.5, "throughput/images": 9.0}


def test_jsonl_tensorboard_line_and_resume_truncation(tmp_path):
    logger = MetricsLogger(tmp_path, ray_metrics=False, total_steps=5)
    for step in range(3):
        logger.log(dict(METRICS, step=step, **{"reward/total": 0.1 * step}))
    line = logger.line(dict(METRICS, step=2, concepts="astro,chelsea"))
    header, row = line.splitlines()
    assert header.split()[:3] == ["step", "reward", "adv_sd"] and row.split()[:2] == ["3/5", "0.5000"]
    assert header.split()[-4:] == ["elapsed", "eta", "time", "concept"]
    elapsed, eta, clock, concept = row.split()[-4:]
    assert re.fullmatch(r"\d+:\d\d:\d\d", elapsed) and re.fullmatch(r"\d+:\d\d:\d\d", eta)
    assert re.fullmatch(r"\d\d:\d\d:\d\d", clock) and concept == "astro,chelsea"
    assert "-" in row.split()   # NaN threshold is shown as '-'
    assert "\n" not in logger.line(METRICS)
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "reward/to')   # a record torn by a kill
    resumed = MetricsLogger(tmp_path, ray_metrics=False)
    resumed.start_at(1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]
    resumed.log(dict(METRICS, step=1))
    resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def _samples(concepts=("astro", "chelsea"), g=3):
    return [SimpleNamespace(concept=c, reward=0.1 * i, advantage=0.1 * i - 0.1, sample_index=i, screen_score=0.2 * i,
                            prompt_text=f"A photo of <{c}> <token_0><token_1>. <{c}> wears a red hat \u2212 {i}",
                            image=np.full((32, 32, 3), 60 * i, np.uint8), rewards={"der": 0.3 * i, "tier": 0.5},
                            attempts=1 + i % 2, prompt_cut=i == 0, answer_ids=[1, 2, 3])
            for c in concepts for i in range(g)]


def test_pictures_and_step_metrics(tmp_path):
    samples = _samples()
    results = [SimpleNamespace(samples=[s for s in samples if s.concept == c], attempt_scores=[0.1, 0.5, 0.9],
                               attempt_accepted=[False, True, True], forced_keeps=0, init_threshold=0.4,
                               timings={"answer": 0.1, "image": 0.5, "screen": 0.1, "reward": 0.2}, dropped=[], reward_failures={"der": 1})
               for c in ("astro", "chelsea")]
    dsog = SimpleNamespace(initialized=True, threshold=0.45)
    m = step_metrics(3, results, samples, {"loss": 0.1, "kl": 0.0, "logp_mismatch_image": 1e-7}, dsog,
                     {"rollout": 1.0, "learn": 0.5, "sync": 0.1, "step": 2.0}, SimpleNamespace(redispatched=0))
    for key in ("reward/total", "reward/der", "adv/std", "adv/equal_reward_groups", "learn/kl",
                "learn/logp_mismatch_image", "dsog/pass_rate", "dsog/threshold", "dsog/attempts_per_sample",
                "dsog/screen_reward_corr", "prompt/cut_fraction", "time/screen", "time/reward", "time/sync",
                "throughput/images_per_s"):
        assert np.isfinite(m[key]), key
    assert m["dsog/threshold"] == 0.4 and m["dsog/next_threshold"] == 0.45 and m["throughput/images"] == 6
    assert m["faults/reward_failures"] == len(results)      # one failed DER attempt per group, summed
    assert all(metric_doc(k) for k in m) and all(d.isascii() for d in METRIC_DOCS.values())
    assert display_prompt(samples[0].prompt_text) == "A photo of <astro> .. . <astro> wears a red hat ? 0"
    grid = save_image_grid(tmp_path / "images" / "step_000003.png", samples, cell=64)
    assert Image.open(grid).size[1] > 2 * 64
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(dict(m, step=s)) + "\n" for s in range(3)))
    assert Image.open(save_reward_curves(tmp_path / "reward_curves.png", tmp_path)).format == "PNG"


@pytest.mark.slow
def test_custom_metrics_reach_the_prometheus_endpoint(ray_cluster, tmp_path):
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    run = f"probe-{uuid.uuid4().hex[:8]}"
    logger = MetricsLogger(tmp_path, tensorboard=False, run_name=run)
    want = ["ray_" + metric_name("grpo", "reward/total"), "ray_" + metric_name("grpo", "learn/grad_norm"),
            "ray_grpo_steps_total"]
    deadline, text = time.monotonic() + 40.0, ""
    while time.monotonic() < deadline:
        logger.log(METRICS)   # gauges are re-set each round; the exporter reports about every 10 s
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        ours = [line for line in text.splitlines() if f'run="{run}"' in line]
        if all(any(line.startswith(name + "{") for line in ours) for name in want):
            break
        time.sleep(2.0)
    ours = [line for line in text.splitlines() if f'run="{run}"' in line]
    for name in want:
        assert any(line.startswith(name + "{") for line in ours), (name, ours[:5])
    total = next(line for line in ours if line.startswith("ray_grpo_reward_total{"))
    assert float(total.rsplit(" ", 1)[1]) == pytest.approx(0.5)
    assert f'ray_job_id="{ray.get_runtime_context().get_job_id()}"' in total
    logger.close()


@pytest.mark.slow
def test_injection_series_are_named_inject_and_reward_failures_exist_at_zero(ray_cluster, tmp_path):
    import ray

    from actors.serving import metrics as reward_metrics

    port = ray.nodes()[0]["MetricsExportPort"]
    run = f"inj-{uuid.uuid4().hex[:8]}"
    logger = MetricsLogger(tmp_path, tensorboard=False, run_name=run, prefix="inject")
    expert = f"probe{uuid.uuid4().hex[:6]}"
    reward_metrics.set_replicas(expert, 2)
    deadline, ours = time.monotonic() + 40.0, []
    while time.monotonic() < deadline:
        logger.log({"step": 0, "chelsea/stage1/loss": 1.5})
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        ours = [line for line in text.splitlines() if f'run="{run}"' in line or f'expert="{expert}"' in line]
        if any(x.startswith("ray_inject_steps_total{") for x in ours) and any(
                x.startswith("ray_reward_serve_failures_total{") for x in ours):
            break
        time.sleep(2.0)
    logger.close()
    assert any(x.startswith("ray_inject_chelsea_stage1_loss{") for x in ours), ours[:5]
    assert any(x.startswith("ray_inject_steps_total{") for x in ours)
    assert not any(x.startswith("ray_grpo_") for x in ours)              # injection never counts as GRPO steps
    fails = [x for x in ours if x.startswith("ray_reward_serve_failures_total{")]
    assert {re.search(r'kind="(\w+)"', x).group(1) for x in fails} == set(reward_metrics.FAILURE_KINDS)
    assert all(float(x.rsplit(" ", 1)[1]) == 0.0 for x in fails)
    assert any(x.startswith("ray_reward_serve_replicas{") and x.endswith(" 2.0") for x in ours)
