"""The run owns what it starts (issue 16): reward applications started by a run are deleted when it ends, stale
ones of its name are replaced, and a shared reward pool (``serve.mode: shared``) is left alone."""
from __future__ import annotations

import pytest

from actors.serving.deploy import app_name, deploy_rewards, deployed_apps, replicas
from configs.serve import ServeConfig

pytestmark = pytest.mark.slow

ONE_STEP = ["run.steps=1", "run.image_grid_every=0"]
APPS = ["rewards-tier", "rewards-ber", "rewards-der", "rewards-fer"]


class Boom(RuntimeError):
    pass


def test_owned_pool_replaces_stale_apps_and_is_deleted_when_the_run_fails(ray_cluster, tmp_path, sample_root,
                                                                          make_trainer, caplog):
    from configs.schema import load_config

    cfg = load_config("tiny_cpu", [f"data.root={sample_root}", *ONE_STEP])
    deploy_rewards(cfg.serve, data_root=str(sample_root))        # what a crashed earlier run left behind
    assert deployed_apps(cfg) == APPS
    with caplog.at_level("WARNING", logger="actors.serving.deploy"):
        trainer = make_trainer(tmp_path, sample_root, ONE_STEP)
    assert trainer.rewards.stale_replaced == APPS
    assert any("replacing stale reward applications" in r.getMessage() for r in caplog.records)

    def fail(phase, step):
        if phase == "learn":
            raise Boom("the run fails mid-step")

    trainer.phase_hook = fail
    try:
        with pytest.raises(Boom):
            trainer.run()
    finally:
        trainer.shutdown()
    assert deployed_apps(cfg) == []                                # nothing of the run is left running


def test_shared_pool_is_used_and_left_alone(ray_cluster, tmp_path, sample_root, make_trainer, shared_rewards):
    from configs.schema import load_config

    with pytest.raises(Exception, match="serve.mode=shared but these applications are not deployed"):
        make_trainer(tmp_path, sample_root, ONE_STEP + ["serve.mode=shared", "serve.app_name=nobody-deployed-this"])
    pool = load_config("tiny_cpu", [f"data.root={sample_root}", *shared_rewards])   # the session's pool
    before = {e: [r["replica_id"] for r in replicas(pool.serve, e)] for e in pool.serve.enabled}
    trainer = make_trainer(tmp_path, sample_root, ONE_STEP + shared_rewards)
    try:
        history = trainer.run()
    finally:
        trainer.shutdown()
    assert [m["step"] for m in history] == [0]
    assert deployed_apps(pool) == [app_name(pool.serve, e) for e in pool.serve.enabled]   # still there
    assert {e: [r["replica_id"] for r in replicas(pool.serve, e)] for e in pool.serve.enabled} == before  # untouched


def test_serve_mode_is_validated():
    with pytest.raises(ValueError, match="serve.mode must be 'owned' or 'shared'"):
        ServeConfig(mode="mine").validate()
