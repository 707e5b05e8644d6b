"""The training service end to end on a real local Ray cluster: every role, outputs, learning, D7 invariance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from PIL import Image

from actors.rollout.engine import GroupRequest

pytestmark = pytest.mark.slow


def test_run_through_every_role_writes_outputs_and_keeps_weights_in_sync(ray_cluster, tmp_path, sample_root, make_trainer):
    trainer = make_trainer(tmp_path, sample_root, ["run.steps=3", "run.checkpoint_every=2", "run.eval_every=3",
                                                   "run.image_grid_every=3", "run.prompts_per_step=2"])
    try:
        history = trainer.run()
        # two DeepSpeed ranks end the step with identical parameters
        ranks = trainer.learners.state_dicts()
        assert ranks[0].keys() == ranks[1].keys()
        for key in ranks[0]:
            assert ranks[0][key].equal(ranks[1][key]), key
        # after the sync every rollout actor holds the learner's weights bit for bit
        for worker in trainer.workers:
            theirs = ray.get(worker.state_dict.remote())
            for key, value in ranks[0].items():
                assert theirs[key].equal(value), key
    finally:
        trainer.shutdown()
    run = trainer.run_dir
    assert len(history) == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("reward/total", "reward/tier", "reward/der", "learn/loss", "learn/grad_norm", "dsog/pass_rate",
                "time/rollout", "time/learn", "time/sync", "throughput/images_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").exists()
    assert (run / "checkpoints" / "step_000003" / "state.json").exists()
    assert (run / "reward_curves.png").exists() and (run / "images" / "step_000003.png").exists()
    assert any((run / "final").iterdir())
    # the held-out evaluation ran at step 3 and its metrics joined that step's record
    assert any(k.startswith("eval/") for k in records[2]) and not any(k.startswith("eval/") for k in records[0])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def _solid_colour_dataset(src, dst, colour=(220, 30, 30)):
    """The sample data with the cat's training photos replaced by one solid colour (a learnable DER target)."""
    import shutil

    shutil.copytree(src, dst)
    folder = dst / "concept" / "train" / "chelsea"
    for path in list(folder.glob("*.png")) + list((folder / "cropped").glob("*.png")):
        Image.new("RGB", Image.open(path).size, colour).save(path)
    return dst


def test_it_learns_a_solid_colour_der_reward(ray_cluster, tmp_path, sample_root, make_trainer):
    """DER (DINOv2 patch-mean features) toward a solid red reference; the policy learns to redden its images."""
    root = _solid_colour_dataset(sample_root, tmp_path / "solid")
    trainer = make_trainer(tmp_path, root, [
        "data.concepts=[chelsea]", "serve.enabled=[der]", "serve.ensemble.weights={animal: {der: 1.0}}",
        "serve.ensemble.required=[]", "serve.der.overrides={pooling: patch_mean}", "dsog.enabled=false",
        "run.steps=20", "run.checkpoint_every=100", "run.image_grid_every=0", "run.prompts_per_step=2",
        "rollout.group_size=8", "learner.lr=1e-2", "objective.alpha_und=0.0", "rollout.answer_max_new_tokens=2",
        "objective.kl_beta=0.0"])
    try:
        history = trainer.run()
    finally:
        trainer.shutdown()
    rewards = [m["reward/total"] for m in history]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    print("DER reward per step:", [round(r, 4) for r in rewards])
    assert last > first + 0.03, rewards


def test_one_or_two_rollout_actors_give_the_same_samples_and_loss(tmp_path, sample_root, make_shared_trainer):
    # the shared pool's experts score each request alone: with two actors a Serve batch could otherwise merge their
    # requests and change scores in the last float bits (bit-identity then holds up to that batching noise)
    common = ["run.steps=1", "run.checkpoint_every=100", "run.image_grid_every=0", "run.prompts_per_step=2"]
    outcomes = []
    for workers in (1, 2):
        trainer = make_shared_trainer(tmp_path / f"w{workers}", sample_root, common + [f"rollout.num_workers={workers}"])
        try:
            if workers == 2:   # the same request on either actor gives bit-identical samples (D7)
                req = GroupRequest(step=5, prompt_index=0, concept="astro", threshold=None)
                a, b = ray.get([w.generate_group.remote(req) for w in trainer.workers])
                for x, y in zip(a.samples, b.samples):
                    assert np.array_equal(x.final_ids, y.final_ids) and x.reward == y.reward
            metrics = trainer.train_step(0)
            samples = trainer._last_samples
            outcomes.append((metrics["learn/loss"], [s.final_ids for s in samples], [s.reward for s in samples]))
        finally:
            trainer.shutdown()
    (loss1, ids1, r1), (loss2, ids2, r2) = outcomes
    assert all(np.array_equal(x, y) for x, y in zip(ids1, ids2))
    assert r1 == r2
    assert loss1 == pytest.approx(loss2, rel=1e-6, abs=1e-9)
