"""Checkpoint integrity (issue 25): content hashes in MANIFEST.json, taken as the files are written; a damaged or
unloadable checkpoint makes ``--resume auto`` and the learner rebuild fall back to the previous intact one with a
warning naming the file; an explicit ``--resume PATH`` stops with a one-line error. The cases are the issue's, on the
real write path (``Trainer.save_checkpoint``) and the real restore (``Trainer._restore`` / ``_restore_into``, i.e.
:func:`actors.driver.restore.restore_run_state`); the learner stands in with real ``torch.save`` / ``torch.load``
files so that a damaged weights file also fails to load. No Ray."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.driver.checkpoint import (
    MANIFEST_FILE,
    RNG_FILE,
    CheckpointError,
    CheckpointManager,
    damage,
    file_digest,
    open_hashed,
    resume_candidates,
)
from actors.driver.pending_rollout import PENDING_FILE
from actors.driver.restore import restore_run_state
from actors.driver.trainer import Trainer
from configs.schema import load_config

WEIGHTS = "learner/learner/model_states.pt"
"""The stand-in learner's weights file inside a checkpoint (as DeepSpeed's ``<tag>/mp_rank_00_model_states.pt``)."""


class TorchLearners:
    """Stands in for the LearnerGroup: 'weights' are a real tensor file written and read with torch."""

    def __init__(self, step: int = 0):
        self.step, self.loaded = step, None

    def save_checkpoint(self, path):
        Path(path, "learner").mkdir(parents=True)
        torch.save({"w": torch.full((64, 64), float(self.step)), "step": self.step},
                   Path(path, "learner", "model_states.pt"))

    def load_checkpoint(self, path):
        sd = torch.load(Path(path, "learner", "model_states.pt"), weights_only=True)
        self.loaded = (str(path), int(sd["step"]))

    def export_final(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)


def _trainer(out: Path, resume=None) -> Trainer:
    cfg = load_config("tiny_cpu", [f"run.output_root={out}", "run.steps=4", "run.checkpoint_every=2",
                                   "run.image_grid_every=0", "run.tensorboard=false"])
    trainer = Trainer(cfg, resume=resume)
    trainer.learners, trainer.concepts = TorchLearners(), ["astro", "chelsea"]
    trainer.dispatcher, trainer.workers = SimpleNamespace(redispatched=0), []
    return trainer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run folder with the checkpoints of steps 2 and 4, written by Trainer.save_checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    trainer = _trainer(out)
    trainer.metrics.start_at(0)
    for step in (2, 4):
        trainer.learners.step = step
        trainer.dispatcher.redispatched = step + 1
        trainer.save_checkpoint(step)
    trainer.metrics.close()
    return trainer.run_dir


def _copy(run: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the finished run under ``tmp``: (output root, newest checkpoint)."""
    out = tmp / "runs"
    shutil.copytree(run, out / run.name)
    return out, out / run.name / "checkpoints" / "step_000004"


def _rewrite_manifest(ckpt: Path, rel: str) -> None:
    """Record ``rel``'s current size and hash in the manifest (a file damaged *before* the manifest was written)."""
    m = json.loads((ckpt / MANIFEST_FILE).read_text())
    f = ckpt / rel
    m["files"][rel] = {"bytes": f.stat().st_size, "sha256": file_digest(f)}
    (ckpt / MANIFEST_FILE).write_text(json.dumps(m))


# -- damage the newest checkpoint: (name, fn(ckpt), the file the warning must name) ------------------------------
def random_bytes_in_weights(ckpt):
    f = ckpt / WEIGHTS
    data = bytearray(f.read_bytes())
    data[4096:8192] = np.random.default_rng(0).bytes(4096)     # 4 KiB inside, same size
    f.write_bytes(bytes(data))
    return f


def manifest_deleted_and_weights_truncated(ckpt):
    (ckpt / MANIFEST_FILE).unlink()
    f = ckpt / WEIGHTS
    f.write_bytes(f.read_bytes()[:1000])
    return ckpt / MANIFEST_FILE


def rng_overwritten_same_size(ckpt):
    f = ckpt / RNG_FILE
    f.write_bytes(b"x" * f.stat().st_size)
    return f


def rng_unusable_with_matching_hash(ckpt):      # the hash was taken of a bad file: the load itself must fail
    (ckpt / RNG_FILE).write_text(json.dumps({"python": [3, [1, 2], None], "numpy": [], "torch": []}))
    _rewrite_manifest(ckpt, RNG_FILE)
    return ckpt / RNG_FILE


def weights_unloadable_with_matching_hash(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"not a torch file" * 100)
    _rewrite_manifest(ckpt, WEIGHTS)
    return ckpt / "learner"


def state_unusable_with_matching_hash(ckpt):
    state = json.loads((ckpt / "state.json").read_text())
    state["dsog"] = {"version": 7}
    (ckpt / "state.json").write_text(json.dumps(state))
    _rewrite_manifest(ckpt, "state.json")
    return ckpt / "state.json"


def pending_rollout_of_another_step(ckpt):
    with open(ckpt / PENDING_FILE, "wb") as fh:
        pickle.dump({"format": 1, "step": 9, "results": []}, fh)
    _rewrite_manifest(ckpt, PENDING_FILE)
    return ckpt / PENDING_FILE


def file_added_after_the_write(ckpt):
    (ckpt / "learner" / "latest").write_text("learner\n")
    return ckpt / "learner" / "latest"


CASES = [random_bytes_in_weights, manifest_deleted_and_weights_truncated, rng_overwritten_same_size,
         rng_unusable_with_matching_hash, weights_unloadable_with_matching_hash, state_unusable_with_matching_hash, pending_rollout_of_another_step, file_added_after_the_write]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_resume_auto_and_rebuild_fall_back_to_the_previous_intact_checkpoint(finished_run, tmp_path, caplog, case):
    out, newest = _copy(finished_run, tmp_path)
    wrong = case(newest)
    with caplog.at_level("WARNING"):
        trainer = _trainer(out, resume="auto")
        trainer._restore()                                          # --resume auto
    try:
        assert trainer.start_step == 2 and trainer.resume_from.name == "step_000002"
        assert trainer.learners.loaded == (str(trainer.resume_from / "learner"), 2)
        assert trainer.dispatcher.redispatched == 3                 # the counter of the checkpoint used
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(str(wrong) in w and "falling back" in w for w in warnings), warnings
        assert not any("Traceback" in w or "\n" in w for w in warnings)
        caplog.clear()
        with caplog.at_level("WARNING"):                           # a learner rebuild: the same restore
            rebuilt = TorchLearners()
            rs = trainer._restore_into(rebuilt)
        assert rs.next_step == 2 and rebuilt.loaded[1] == 2 and rs.rng is not None and rs.redispatched == 3
        assert any(str(wrong) in r.getMessage() for r in caplog.records)
    finally:
        trainer.metrics.close()


def test_intact_checkpoints_resume_the_newest_with_every_part(finished_run, tmp_path):
    out, newest = _copy(finished_run, tmp_path)
    assert damage(newest, verify=True) is None
    trainer = _trainer(out, resume="auto")
    try:
        trainer._restore()
        assert trainer.start_step == 4 and trainer.learners.loaded[1] == 4 and trainer.dispatcher.redispatched == 5
    finally:
        trainer.metrics.close()


def test_explicit_resume_of_a_damaged_checkpoint_stops_with_one_line(finished_run, tmp_path):
    out, newest = _copy(finished_run, tmp_path)
    f = random_bytes_in_weights(newest)
    found, explicit = resume_candidates(out / finished_run.name, str(newest))   # sizes match: found, explicit
    assert found == [newest] and explicit
    trainer = _trainer(out, resume=str(newest))
    try:
        with pytest.raises(CheckpointError) as info:
            trainer._restore()
    finally:
        trainer.metrics.close()
    msg = str(info.value)
    assert str(f) in msg and "content hash" in msg and "\n" not in msg
    assert trainer.learners.loaded is None                          # nothing loaded, no fall-back
    _, other = _copy(finished_run, tmp_path / "b")
    rng_overwritten_same_size(other)
    with pytest.raises(CheckpointError, match=r"step_000004/rng\.json does not match its sha256"):
        restore_run_state([other], TorchLearners(), explicit=True)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(finished_run, tmp_path):
    out, newest = _copy(finished_run, tmp_path)
    for ckpt in (newest, newest.with_name("step_000002")):
        (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        _trainer(out, resume="auto")
    # all pass the size check but none loads: the restore names each one
    out2, newest2 = _copy(finished_run, tmp_path / "b")
    random_bytes_in_weights(newest2)
    random_bytes_in_weights(newest2.with_name("step_000002"))
    with pytest.raises(CheckpointError, match=r"no checkpoint could be loaded \(2 tried.*step_000004.*step_000002"):
        restore_run_state(CheckpointManager(out2 / finished_run.name).candidates(), TorchLearners())


def test_launch_train_exits_2_with_one_line_before_ray_starts(finished_run, tmp_path, sample_root, capsys,
                                                              monkeypatch):
    import launch.train as train

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started before the checkpoint was checked")

    monkeypatch.setattr(train, "connect_ray", no_ray)   # the error must come before any cluster is joined or started
    out, newest = _copy(finished_run, tmp_path)
    manifest_deleted_and_weights_truncated(newest)
    args = ["--config", "tiny_cpu", f"data.root={sample_root}", f"run.output_root={out}", "--resume", str(newest)]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --resume") and MANIFEST_FILE in err


def test_manifest_hashes_are_taken_as_files_are_written_and_match_the_bytes(tmp_path, monkeypatch):
    import actors.driver.checkpoint as ck

    mgr = CheckpointManager(tmp_path)
    tmp = mgr.begin(3)
    with open_hashed(tmp / "written.bin") as fh:                   # the driver's way: hashed while writing
        for _ in range(3):
            fh.write(os.urandom(300_000))
    (tmp / "learner").mkdir()
    (tmp / "learner" / "rank0.pt").write_bytes(os.urandom(1 << 20))  # another process's file: hashed at commit
    streamed = []
    real = ck.file_digest
    monkeypatch.setattr(ck, "file_digest", lambda p: streamed.append(Path(p).name) or real(p))
    final = mgr.commit(tmp, 3, {"next_step": 3, "dsog": {}}, {"run": {}})
    assert streamed == ["rank0.pt"]                                 # state/config/written.bin were not read again
    files = json.loads((final / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {"written.bin", "learner/rank0.pt", "state.json", "config.yaml", "git_revision.txt"}
    for rel, rec in files.items():
        data = (final / rel).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
