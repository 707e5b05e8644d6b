"""UniPercept through Ray Serve in its own interpreter (issue 18): same scores as the expert run directly, a dead
replica replaced, a broken environment reported before anything is deployed, and a tiny training run with
UniPercept in the ensemble (as DSOG screen and in the evaluation)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from rewards.base import ScoreBatch

pytestmark = pytest.mark.slow


def _cfg(app: str):
    from configs.serve import ServeConfig

    cfg = ServeConfig.tiny()
    cfg.app_name = app
    cfg.enabled = ["unipercept"]
    cfg.unipercept.health_check_period_s = 0.5
    cfg.ensemble.weights = {"object": {"unipercept": 1.0}}
    cfg.ensemble.required = ["unipercept"]
    return cfg


def test_served_scores_equal_direct_and_dead_replica_is_replaced(ray_cluster, unipercept_python, unipercept_tiny):
    import ray

    from actors.serving.client import RewardClient
    from actors.serving.deploy import deploy_rewards, replicas, shutdown_rewards, wait_for_replicas

    cfg = _cfg("rwup")
    images = np.random.default_rng(5).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    batch = ScoreBatch(images=images)
    want = unipercept_tiny.score(batch)
    deploy_rewards(cfg)
    try:
        client = RewardClient(cfg)
        info = client.describe("unipercept")
        assert info["python"] == str(unipercept_python) and info["requires"] == ["images"]
        got = client.score_expert("unipercept", batch)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.all((got * 100 >= 0) & (got * 100 <= 100))
        total = client.score_all(batch, ["object"] * 3).total
        np.testing.assert_allclose(total, want, atol=1e-5)
        before = replicas(cfg, "unipercept")
        ray.kill(ray.get_actor(before[0]["actor_name"], namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 300
        while wait_for_replicas(cfg, "unipercept", 1, timeout_s=300)[0]["replica_id"] == before[0]["replica_id"]:
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(0.5)
        np.testing.assert_allclose(client.score_expert("unipercept", batch), want, atol=1e-5)
        reply = client.handle("unipercept").score.remote(batch).result(timeout_s=120)
        assert reply["replica"] != before[0]["replica_id"]
        np.testing.assert_allclose(reply["scores"], want, atol=1e-5)
    finally:
        shutdown_rewards(cfg)


def test_broken_environment_fails_before_deploying(ray_cluster, tmp_path):
    from ray.serve.context import _get_global_client

    from actors.serving.deploy import app_name, deploy_rewards
    from rewards.expert_env import ExpertEnvError

    cfg = _cfg("rwbroken")
    broken = tmp_path / "env" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named transformers' >&2\nexit 1\n")
    broken.chmod(0o755)
    cfg.unipercept.python = str(broken)
    with pytest.raises(ExpertEnvError, match=r"'unipercept'.*is broken \(ModuleNotFoundError.*build_reward_env "
                                             r"unipercept --force"):
        deploy_rewards(cfg)
    cfg.unipercept.python = str(tmp_path / "missing" / "bin" / "python")
    with pytest.raises(ExpertEnvError, match="does not exist; build it with `python -m launch.build_reward_env"):
        deploy_rewards(cfg)
    client = _get_global_client(raise_if_no_controller_running=False)
    apps = client.get_serve_details().get("applications", {}) if client else {}
    assert app_name(cfg, "unipercept") not in apps


def test_tiny_training_run_with_unipercept_in_the_ensemble(ray_cluster, unipercept_python, tmp_path, sample_root,
                                                           make_trainer):
    trainer = make_trainer(tmp_path, sample_root, [
        "data.concepts=[chelsea]", "serve.enabled=[tier,der,unipercept]",
        "serve.ensemble.weights={animal: {tier: 0.4, der: 0.3, unipercept: 0.3}}", "serve.ensemble.required=[tier]",
        "dsog.scorer=unipercept", "run.steps=2", "run.eval_every=2", "run.checkpoint_every=100",
        "run.image_grid_every=0", "run.prompts_per_step=1", "eval.train_limit=1"])
    try:
        history = trainer.run()
    finally:
        trainer.shutdown()
    assert len(history) == 2
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert 0.0 <= r["reward/unipercept"] <= 1.0 and np.isfinite(r["reward/total"])
    for key in ("eval/iaa", "eval/iqa", "eval/ista"):
        assert 0.0 <= records[-1][key] <= 100.0, key
