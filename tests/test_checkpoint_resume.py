"""Checkpoints: atomic writes, retention, SIGTERM + resume bookkeeping (no Ray), and exact resume end to end."""
from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.driver.checkpoint import (
    CheckpointManager,
    is_complete,
    read_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from actors.driver.trainer import Preempted, Trainer
from configs.schema import load_config
from tests.conftest import record_samples


def _commit(mgr: CheckpointManager, step: int) -> Path:
    tmp = mgr.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "weights.bin").write_bytes(b"w" * 64)
    return mgr.commit(tmp, step, {"next_step": step, "dsog": {}}, {"run": {"steps": 9}})


def test_a_write_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    good = _commit(mgr, 2)
    # 1) an exception between begin() and commit()
    tmp = mgr.begin(4)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "weights.bin").write_bytes(b"half")
    # 2) a kill during commit, after the old final folder was moved aside (re-doing step 2 after a resume)
    os.replace(good, good.with_name(good.name + ".old"))
    for resume in ("auto", str(tmp_path)):
        found = resolve_resume(tmp_path, resume)
        assert found is not None and found.name == "step_000002.old" and is_complete(found)
    os.replace(good.with_name(good.name + ".old"), good)
    for resume in ("auto", str(good), str(tmp_path)):
        assert resolve_resume(tmp_path, resume) == good
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000002"
    state, cfg = read_checkpoint(good)
    assert state["next_step"] == 2 and cfg == {"run": {"steps": 9}}
    assert (good / "git_revision.txt").read_text().strip()
    with pytest.raises(Exception, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp))   # the half-written folder is never accepted
    # the next complete write cleans the debris and moves `latest`
    assert _commit(mgr, 4).name == "step_000004" and not tmp.exists()
    assert mgr.latest().name == "step_000004"


def test_retention_keeps_last_k_by_commit_order_and_never_the_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _commit(mgr, step)
    assert [p.name for p in mgr.complete()] == ["step_000003", "step_000004"]
    _commit(mgr, 3)   # resumed from step 3 (an older point): it becomes the newest, step 4 the stale one
    assert mgr.latest().name == "step_000003"
    _commit(mgr, 2)
    assert [p.name for p in mgr.complete()] == ["step_000003", "step_000002"] and mgr.latest().name == "step_000002"


def test_damaged_checkpoint_names_the_file_and_resume_auto_falls_back_with_a_warning(tmp_path, caplog):
    from actors.driver.checkpoint import CheckpointError

    mgr = CheckpointManager(tmp_path, keep_last=3)
    good, bad = _commit(mgr, 2), _commit(mgr, 4)
    weights = bad / "learner" / "weights.bin"
    weights.write_bytes(b"w" * 10)                                     # truncated after the write
    with caplog.at_level("WARNING", logger="actors.driver.checkpoint"):
        assert resolve_resume(tmp_path, "auto") == good
    assert any(str(weights) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match=f"{weights}.*10 bytes, 64 were written"):
        resolve_resume(tmp_path, str(bad))                             # an explicit path: loud, no fall-back
    weights.unlink()                                                   # a missing file
    with pytest.raises(CheckpointError, match=f"file {weights} is missing"):
        resolve_resume(tmp_path, str(bad))
    assert mgr.latest() == good
    # a dangling `latest` (its folder deleted): warned about, the newest intact one is used
    import shutil

    shutil.rmtree(bad)
    caplog.clear()
    with caplog.at_level("WARNING", logger="actors.driver.checkpoint"):
        assert resolve_resume(tmp_path, "auto") == good
    assert any("dangling" in r.getMessage() and "step_000004" in r.getMessage() for r in caplog.records)
    shutil.rmtree(good)
    assert resolve_resume(tmp_path, "auto") is None


def test_rng_state_roundtrip():
    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------------------------------- loop with stubs
class _StubLearners:
    """Stands in for the LearnerGroup: 'weights' are a step counter saved in the checkpoint."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, path):
        Path(path).mkdir(parents=True)
        Path(path, "weights.json").write_text("{}")

    def load_checkpoint(self, path):
        assert Path(path, "weights.json").exists()
        self.loaded = path

    def export_final(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)


def _stub_trainer(tmp_path, resume=None, sigterm_at=None) -> Trainer:
    cfg = load_config("tiny_cpu", [f"run.output_root={tmp_path}", "run.steps=4", "run.checkpoint_every=3",
                                   "run.image_grid_every=2", "run.samples_every=0"])   # stub samples: no records
    trainer = Trainer(cfg, resume=resume)
    trainer.learners, trainer.concepts = _StubLearners(), ["astro", "chelsea"]
    trainer.dispatcher, trainer.workers = SimpleNamespace(redispatched=0), []

    def train_step(step):
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        trainer._last_samples = [SimpleNamespace(concept=c, reward=0.1 * step + i, advantage=0.0, sample_index=i,
                                                 prompt_text=f"A photo of <{c}> <token_0>. step {step}",
                                                 image=np.full((16, 16, 3), 40 * i, np.uint8))
                                 for c in trainer.concepts for i in range(2)]
        return {"step": step, "reward/total": 0.1 * step, "reward/tier": 0.2, "learn/loss": -step / 10}

    trainer.train_step = train_step
    trainer._restore()
    return trainer


def test_sigterm_checkpoints_then_resume_auto_continues_without_duplicate_records(tmp_path):
    first = _stub_trainer(tmp_path, sigterm_at=1)
    with pytest.raises(Preempted):
        first.run()
    run = first.run_dir
    assert CheckpointManager(run).latest().name == "step_000002"
    second = _stub_trainer(tmp_path, resume="auto")
    assert second.start_step == 2 and second.learners.loaded.endswith("step_000002/learner")
    assert [m["step"] for m in second.run()] == [2, 3]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert (run / "images" / "step_000002.png").exists() and (run / "images" / "step_000004.png").exists()
    assert (run / "reward_curves.png").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert CheckpointManager(run).latest().name == "step_000004"


# ---------------------------------------------------------------------------------- exact resume (Ray)
@pytest.mark.slow
def test_resume_after_step_k_reproduces_the_uninterrupted_run(tmp_path, sample_root, make_shared_trainer, caplog):
    root, make_trainer = sample_root, make_shared_trainer
    common = ["run.steps=4", "run.checkpoint_every=2", "run.keep_last=3", "run.image_grid_every=2"]

    seen_a, seen_b = {}, {}
    a = make_trainer(tmp_path, root, common)
    try:
        record_samples(a, seen_a)
        hist_a = {m["step"]: m for m in a.run()}
        weights_a = a.learners.state_dict_rank0()
    finally:
        a.shutdown()
    run = a.run_dir
    assert (run / "metrics.jsonl").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "reward_curves.png").exists() and (run / "images" / "step_000004.png").exists()
    ckpt = run / "checkpoints" / "step_000002"
    assert {"learner", "state.json", "config.yaml", "git_revision.txt", "rng.json"} <= {p.name for p in ckpt.iterdir()}

    with caplog.at_level("WARNING", logger="actors.driver.trainer"):
        b = make_trainer(tmp_path, root, common + ["run.log_every=2"], resume=str(ckpt))
    try:
        assert any("changed config" in r.message and "run.log_every" in r.message for r in caplog.records)
        assert b.start_step == 2 and b.dsog.state_dict() == json.loads((ckpt / "state.json").read_text())["dsog"]
        record_samples(b, seen_b)
        hist_b = {m["step"]: m for m in b.run()}
        weights_b = b.learners.state_dict_rank0()
    finally:
        b.shutdown()
    assert sorted(hist_b) == [2, 3]
    for step in (2, 3):
        assert seen_b[step] == seen_a[step], step   # same prompts, answers and rewards (D7)
        for key in ("reward/total", "learn/loss", "learn/grad_norm", "learn/kl", "dsog/threshold"):
            assert hist_b[step][key] == pytest.approx(hist_a[step][key], rel=1e-6, abs=1e-9), (step, key)
    for key, value in weights_a.items():  # optimizer state restored: the updates after the resume agree too
        assert torch.allclose(weights_b[key], value, rtol=0, atol=1e-6), key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]


def test_config_changes_name_dotted_keys_including_new_sections():
    from actors.driver.checkpoint import config_changes

    old = {"run": {"steps": 4, "log_every": 1}}
    new = {"run": {"steps": 4, "log_every": 2}, "eval": {"every": 1}}
    assert config_changes(old, new) == ["eval.every: None -> 1", "run.log_every: 1 -> 2"]
