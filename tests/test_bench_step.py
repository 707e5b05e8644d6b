"""launch/bench/step: its pieces run on a very small setting and produce tables with the expected rows (no timing
asserts). The full step on a local Ray cluster is the one slow test."""
from __future__ import annotations

import pytest

from configs.schema import load_config
from launch.bench import step as bs
from rl.data.sample import write_sample_dataset

SMALL = ["sampler.timesteps=4", "dsog.screen_step=2", "rollout.group_size=2", "rollout.answer_max_new_tokens=4",
         "objective.max_answer_tokens=4", "data.concepts=[chelsea]", "serve.enabled=[ber, der]",
         "serve.ensemble.weights={animal: {der: 1.0}}", "serve.ensemble.required=[]"]


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "sample"
    write_sample_dataset(root, image_size=128, log=lambda *_: None)
    return root


@pytest.fixture(scope="module")
def small(sample_root, tmp_path_factory):
    cfg = bs.bench_config(False, [f"data.root={sample_root}", *SMALL], str(tmp_path_factory.mktemp("runs")))
    return bs.inprocess_group(cfg)


def _metrics(step: float) -> dict:
    return {"time/step": step, "time/rollout": 0.4 * step, "time/answer": 0.05, "time/image": 0.2,
            "time/screen": 0.04, "time/reward": 0.1, "time/learn": 0.5 * step, "learn/replay_s": 0.4 * step,
            "learn/optim_s": 0.01, "learn/units_per_rank": 26.0, "time/sync": 0.02, "throughput/images": 4.0,
            "throughput/images_per_s": 4.0 / step, "dsog/attempts_per_sample": 1.75, "dsog/pass_rate": 0.4,
            "dsog/forced_keeps": 1.0}


def test_phase_rows_and_step_table():
    history = [_metrics(s) for s in (2.0, 1.0, 1.5)]
    rows = {r["phase"]: r for r in bs.phase_rows(history)}
    assert rows["**step**"]["seconds"] == 1.5 and rows["**step**"]["range"] == "1.000–2.000"
    top = ("rollout (wall)", "learn (wall)", "weight sync", "driver (advantages, DSOG update)")
    assert sum(rows[p]["share"] for p in top) == pytest.approx(100.0)
    assert rows["· DSOG screen"]["seconds"] == pytest.approx(0.04)
    assert rows["· dispatch / transfer / prompts"]["seconds"] == pytest.approx(0.6 - 0.39)
    memory = [{"role": "driver", "processes": 1, "peak_rss_mib": 600.0, "rss_mib": 590.0, "peak_cuda_mib": None},
              {"role": "learner rank", "processes": 2, "peak_rss_mib": 1700.0, "rss_mib": 1690.0,
               "peak_cuda_mib": None}]

    text = bs.render_step(bs.StepRun(history, memory, 30.0), load_config("tiny_cpu", []))
    for needle in ("| rollout (wall) |", "| · MaskGIT image (incl. preview decode) |",
                   "| · reward scoring (served) |", "| learn (wall) |", "| · replay forward + backward |",
                   "| weight sync |", "| **step** |",
                   "images/s: **2.67**", "DSOG attempts per kept sample: **1.75**", "| learner rank | 2 | 1700 |"):
        assert needle in text, needle


def test_role_of_ray_process_titles():
    assert bs.role_of("ray::RolloutWorker.generate_group") == "rollout actor"
    assert bs.role_of("ray::LearnerWorker") == "learner rank"
    assert bs.role_of("ray::ServeReplica:rewards-der:reward-der") == "reward replica der"
    assert bs.role_of("ray::ServeReplica:rewards-fer:reward-fer.check_health") == "reward replica fer"
    assert bs.role_of("ray::ProxyActor") == "Serve controller + proxy"
    assert bs.role_of("/x/raylet --raylet_socket_name=/tmp/s").startswith("Ray system")


def test_baselines_on_a_small_setting(small):
    a = bs.bench_sampler(small, repeats=1)
    assert a["same"] == 1.0 and a["sampler"] > 0 and a["reference"] > 0 and a["T"] == 4
    b = bs.bench_reward_calls(small, repeats=1)
    assert b["screen_calls"] >= 1 and b["calls"] == b["screen_calls"] + 1 and b["samples"] >= 4
    mem = bs.learner_memory(small, ks=(1, 2))
    keep = [r for r in mem if r["mode"] == bs.KEEP]
    per = [r for r in mem if r["mode"] == bs.PER_STEP]
    assert [r["k"] for r in keep] == [1, 2] and [r["k"] for r in per] == [1, 2]
    # k kept graphs save k times one step's tensors; per-step backward never holds more than one step
    assert keep[1]["saved_mib"] == pytest.approx(2 * keep[0]["saved_mib"])
    assert per[0]["saved_mib"] == per[1]["saved_mib"] == pytest.approx(keep[0]["saved_mib"])
    # the meta-device estimator reproduces the measured bytes at the measured shapes
    cfg = small.cfg
    here = bs.meta_saved_per_step(small.policy.phi_config, small.policy.tok, bs.samples_t2i(small.samples),
                                  cfg.model.dtype, cfg.sampler.guidance_scale, cfg.objective)
    assert here / bs.MIB == pytest.approx(keep[0]["saved_mib"])
    real = bs.real_shape_saved_per_step("bfloat16", cfg.sampler.guidance_scale, cfg.objective)
    assert 1 < real / 2**30 < 10   # GiB per kept step at Show-o 512 shapes
    text = bs.render_baselines(None, a, b, mem, {"bfloat16": real}, here, cfg.sampler.timesteps)
    for needle in ("(a) image generation, s/image", "(b) reward + DSOG screen calls", "(c) learner peak memory at T=4",
                   "(c) real shapes, T=50, bfloat16", "| keep k graphs, one backward | 2 |",
                   "| per-step backward (run_units) | 1 |", "identical grid tokens 100 %"):
        assert needle in text, needle


def test_main_skip_step_writes_the_tables(sample_root, tmp_path):
    out = tmp_path / "bench.md"
    text = bs.main(["--skip-step", "--repeats", "1", "--out", str(out), f"data.root={sample_root}",
                    f"run.output_root={tmp_path}", *SMALL])
    assert out.read_text().strip() == text.strip()
    assert text.startswith("Machine: ") and "**Baselines**" in text and "One GRPO step" not in text
    assert "(c) real shapes, T=50, float32" in text


def test_real_shape_config_fits_one_gpu(sample_root, tmp_path):
    from actors.cluster.placement import check_fits, plan_layout, roles_from_config

    cfg = bs.bench_config(True, [f"data.root={sample_root}"], str(tmp_path))
    assert (cfg.model.preset, cfg.model.random_init, cfg.sampler.timesteps) == ("real", True, 50)
    roles = roles_from_config(cfg)
    check_fits(plan_layout(roles, cfg.placement), roles, cfg.placement.layout, {"CPU": 16.0, "GPU": 1.0})


@pytest.mark.slow
def test_one_step_on_local_ray(ray_cluster, sample_root, tmp_path):
    cfg = bs.bench_config(False, [f"data.root={sample_root}", *SMALL], str(tmp_path))
    run = bs.measure_steps(cfg, warmup=1, steps=1, log=lambda *_: None)
    assert len(run.history) == 1 and run.history[0]["time/step"] > 0
    roles = {r["role"] for r in run.memory}
    assert {"driver", "rollout actor", "learner rank", "reward replica der"} <= roles
    text = bs.render_step(run, cfg)
    for needle in ("| rollout (wall) |", "| learn (wall) |", "| weight sync |", "| **step** |", "images/s",
                   "DSOG attempts per kept sample", "| rollout actor | 1 |"):
        assert needle in text, needle


def test_scaling_tables_end_with_the_figures():
    from types import SimpleNamespace

    from launch.bench.scaling import BEFORE, render

    cfg = SimpleNamespace(sampler=SimpleNamespace(timesteps=12), dsog=SimpleNamespace(screen_step=4, max_attempts=2),
                          rollout=SimpleNamespace(group_size=8, num_workers=1, engine="continuous", max_batch=16,
                                                  max_inflight_calls=4), learner=SimpleNamespace(num_ranks=2))
    shard = {BEFORE: 1.0, "1 actor, shards of 1": 1.5, "2 actors, shards of 1": 0.8, "1 actor, shards of 4": 1.1,
             "2 actors, shards of 4": 0.625}
    cont = {"lockstep": {"seconds": 3.0, "busy_fraction": 0.5}, "continuous": {"seconds": 1.5, "busy_fraction": 0.9},
            "lockstep, 0.25 s per call": {"seconds": 8.0, "busy_fraction": 0.2},
            "continuous, 0.25 s per call": {"seconds": 2.0, "busy_fraction": 0.7}}
    tables, figures = render(shard, {1: 1000.0, 2: 1500.0, 4: 1800.0, 8: 1700.0}, {"none": 3.0, "one_step": 2.0},
                             cfg, cont, 0.25)
    assert figures == ["continuous-batching speed-up: 2.00×", "reward-latency hiding: 4.00×",
                       "group-sharding speed-up: 1.60×", "overlap speed-up: 1.50×", "units-per-forward speed-up: 1.80×"]
    assert "| continuous, 0.25 s per call | 2.00 | 0.70 | 4.00× |" in tables
    assert "| 2 actors, shards of 4 | 0.62 | n/a | 1.60× |" in tables and "| 4 | 1800 | 1.80× |" in tables
    assert "| one_step | 2.00 | 0.500 | 1.50× |" in tables
    assert bs.parse_args(["--scaling"]).scaling


def test_the_prepared_gpu_check_runs_its_code_on_cpu(monkeypatch, capsys):
    """launch.bench.gpu (run by hand on a GPU machine) on the tiny model, then on Show-o 512's layout (vocab 58498,
    129 text + 1024 image tokens) with shrunk widths: the sampler records the group, the learner code replays it."""
    from backbone.phi import ShowoPhiConfig
    from launch.bench import gpu as bench_gpu

    text = bench_gpu.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--timesteps", "3", "--repeats", "1",
                           "--group", "3", "--batches", "1,4"])
    assert "| learner replay, units_per_forward 4 |" in text and "| running batch 4 (one step) |" in text
    assert [ln.split(":")[0] for ln in text.splitlines()[-3:]] == [
        "learner rank GiB", "running batch 1 images/s", "running batch 4 images/s"]
    monkeypatch.setattr(ShowoPhiConfig, "real", classmethod(lambda cls, vocab_size=58498: cls.tiny(vocab_size)))
    text = bench_gpu.main(["--device", "cpu", "--dtype", "float32", "--timesteps", "2", "--repeats", "1",
                           "--group", "2", "--batches", ""])
    assert "Show-o 512 shapes" in text and "| sampler, one group |" in text
    assert [ln.split(":")[0] for ln in text.splitlines()[-5:]] == [
        "sampler images/s", "sampler MFU", "replay MFU", "replay peak GiB", "learner rank GiB"]
