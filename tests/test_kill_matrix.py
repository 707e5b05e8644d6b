"""Kill matrix (issue 16): each role SIGKILLed at each phase of a step (rollout, learn, sync, checkpoint write).

One run per role, with a kill at a different phase in each of its first 4 steps (checkpoint every step; a 5th step
runs clean, so a victim killed at the last checkpoint write is replaced before the end). Every run
continues and ends with the same metrics and final weights as the uninterrupted run (D7); ``metrics.jsonl`` holds
each step exactly once. Kills are real SIGKILLs of the actor's process, fired through ``Trainer.phase_hook``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading

import pytest
import ray

pytestmark = pytest.mark.slow

PHASES = ("rollout", "learn", "sync", "checkpoint")
STEPS = 5
OVERRIDES = [f"run.steps={STEPS}", "run.checkpoint_every=1", "run.keep_last=5", "run.image_grid_every=0",
             "run.max_learner_restarts=6", "serve.ber.max_batch_size=1", "serve.tier.retries=8",
             "serve.retry_backoff_s=1.0", "rollout.max_restarts=6", "sync.timeout_s=30"]
COMPARED = ("reward/", "adv/", "learn/loss", "learn/kl", "learn/clip_frac", "learn/grad_norm", "dsog/",
            "prompt/", "throughput/images")


def actor_pid(handle) -> int:
    """The OS process id of a Ray actor, from the GCS actor table (no call into the actor)."""
    from ray._private.state import actors

    return int(actors(actor_id=handle._actor_id.hex())["Pid"])


def sigkill(handle, delay_s: float = 0.0) -> threading.Thread | None:
    """SIGKILL the actor's process now, or after ``delay_s`` in a thread (so the kill lands mid-phase)."""
    pid = actor_pid(handle)

    def kill():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    if delay_s <= 0:
        kill()
        return None
    t = threading.Timer(delay_s, kill)
    t.start()
    return t


def reward_replica(trainer, expert: str = "tier"):
    from actors.serving.deploy import replicas

    running = [r for r in replicas(trainer.cfg.serve, expert) if r["state"] == "RUNNING"]
    assert running, f"no running replica of {expert}"
    return ray.get_actor(running[0]["actor_name"], namespace="serve")


VICTIMS = {
    "rollout actor": lambda t: t.workers[0],
    "learner rank": lambda t: t.learners.workers[1],
    "reward replica": reward_replica,
}
# mid-phase delays: a rollout kill lands while groups are generating, a learner kill inside the update
DELAYS = {"rollout": 1.0, "learn": 0.3, "sync": 0.0, "checkpoint": 0.0}


def _run(make_trainer, out, root, role=None):
    trainer = make_trainer(out, root, OVERRIDES)
    fired, timers = [], []
    if role is not None:
        def hook(phase, step):
            if step < len(PHASES) and PHASES[step] == phase and (phase, step) not in {(p, s) for p, s, _ in fired}:
                fired.append((phase, step, actor_pid(VICTIMS[role](trainer))))
                timers.append(sigkill(VICTIMS[role](trainer), DELAYS[phase]))
        trainer.phase_hook = hook
    try:
        history = trainer.run()
        ranks = trainer.learners.state_dicts()
        rollout = ray.get(trainer.workers[0].state_dict.remote())
    finally:
        for t in timers:
            if t is not None:
                t.join()
        trainer.shutdown()
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": str(trainer.run_dir), "history": history, "rows": rows, "weights": ranks[0], "ranks": ranks,
            "rollout": rollout, "fired": fired,
            "learner_restarts": trainer.learner_restarts, "rollout_restarts": dict(trainer.rollout_restarts)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_root, make_trainer_module):
    return _run(make_trainer_module, tmp_path_factory.mktemp("clean"), sample_root)


@pytest.fixture(scope="module")
def make_trainer_module(shared_rewards):
    """Trainers attached to the session's shared reward pool (the runs that kill a reward replica own theirs)."""
    from tests.conftest import make_trainer_factory

    return make_trainer_factory(shared_rewards)


def _same_metrics(a: dict, b: dict) -> list[str]:
    bad = []
    for k, v in a.items():
        if k.startswith(COMPARED) and not k.endswith(("_per_s", "time_s")) and isinstance(v, float):
            w = b.get(k)
            if not (w is not None and (math.isclose(v, w, rel_tol=1e-5, abs_tol=1e-7)
                                       or (math.isnan(v) and math.isnan(w)))):
                bad.append(f"step {a['step']} {k}: {v} vs {w}")
    return bad


@pytest.mark.parametrize("role", list(VICTIMS))
def test_kill_matrix(role, reference, tmp_path, sample_root, make_trainer_module, make_trainer):
    make = make_trainer if role == "reward replica" else make_trainer_module   # that run owns its pool
    got = _run(make, tmp_path, sample_root, role)
    assert [p for p, _, _ in got["fired"]] == list(PHASES)            # every phase was hit once
    assert [r["step"] for r in got["rows"]] == list(range(STEPS))      # each step exactly once on disk
    bad = [x for a, b in zip(reference["rows"], got["rows"]) for x in _same_metrics(a, b)]
    assert not bad, bad
    for name, ref in reference["weights"].items():                     # same final learner weights (D7)
        assert (got["weights"][name] - ref).abs().max().item() <= 1e-6, name
    for name, ref in reference["rollout"].items():                     # and the rollout actor holds them
        assert (got["rollout"][name] - ref).abs().max().item() <= 1e-6, name
    if role == "rollout actor":   # replaced at every phase, the learner group never rebuilt
        assert got["learner_restarts"] == 0 and got["rollout_restarts"] == {0: len(PHASES)}
    if role == "reward replica":  # each dead replica is counted once, even where Serve re-routed its requests
        assert sum(r["faults/reward_replicas_lost"] for r in got["rows"]) == len(PHASES)
    if role == "learner rank":    # rebuilt from the last checkpoint each time; the rebuilt ranks agree bit for bit
        assert got["learner_restarts"] == len(PHASES) and not got["rollout_restarts"]
        for key in got["ranks"][0]:
            assert got["ranks"][0][key].equal(got["ranks"][1][key]), key
    print(f"\nKILL MATRIX {role}: {got['fired']} -> continued; learner rebuilds {got['learner_restarts']}, "
          f"rollout replacements {got['rollout_restarts']}")


DRIVER = """
import os, signal, sys
from configs.schema import load_config
from launch.train import connect_ray
from actors.driver.trainer import Trainer

out, root, phase, step, shared = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
from tests.conftest import TINY_TRAINER_OVERRIDES
from tests.test_kill_matrix import OVERRIDES
cfg = load_config("tiny_cpu", [f"data.root={root}", f"run.output_root={out}", *TINY_TRAINER_OVERRIDES, *shared,
                               *OVERRIDES])
connect_ray(cfg)                       # joins the test's cluster through RAY_ADDRESS
trainer = Trainer(cfg, resume="auto")
try:
    trainer.setup()
    trainer.phase_hook = lambda p, s: os.kill(os.getpid(), signal.SIGKILL) if (p, s) == (phase, step) else None
    trainer.run()
finally:
    trainer.shutdown()
"""


def _assert_like_reference(reference: dict, run_dir) -> None:
    """A run folder written by another process holds each step once, the uninterrupted run's metrics and its final
    weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    bad = [x for a, b in zip(reference["rows"], rows) for x in _same_metrics(a, b)]
    assert not bad, bad
    ref_final = next(Path(reference["run_dir"]).glob("final/*.safetensors"))
    got, ref = load_file(str(run_dir / "final" / ref_final.name)), load_file(str(ref_final))
    for name, value in ref.items():
        assert (got[name] - value).abs().max().item() <= 1e-6, name


def test_kill_matrix_driver(reference, ray_cluster, shared_rewards, tmp_path, sample_root):
    """The driver SIGKILLed at each phase (one phase per step); each restart with --resume auto continues from the
    last checkpoint; the run ends with the uninterrupted run's metrics and weights, each step once on disk. The
    drivers use the session's shared reward pool (which outlives them); a killed driver's owned pool being replaced
    by the next run is tests/test_run_ownership.py's case."""
    import subprocess
    import sys
    from pathlib import Path

    root_dir = Path(__file__).resolve().parents[1]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address_info["gcs_address"], PYTHONPATH=str(root_dir))
    outcomes = []
    for step, phase in [*enumerate(PHASES), (None, None)]:
        args = [sys.executable, "-c", DRIVER, str(tmp_path), str(sample_root), str(phase),
                str(-1 if step is None else step), *shared_rewards]
        proc = subprocess.run(args, cwd=root_dir, env=env, capture_output=True, text=True, timeout=1200)
        outcomes.append((phase, step, proc.returncode))
        expected = 0 if phase is None else -signal.SIGKILL
        assert proc.returncode == expected, (phase, step, proc.stderr[-4000:])
    _assert_like_reference(reference, next(tmp_path.glob("*/metrics.jsonl")).parent)
    print(f"\nKILL MATRIX driver: {outcomes} -> resumed each time")


# ------------------------------------------------------------------------------------------------ several at once
def _serve_controller():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def test_three_roles_killed_in_the_same_second(reference, tmp_path, sample_root, make_trainer_module, caplog):
    """The rollout actor, learner rank 1 and the Serve controller SIGKILLed together mid-update (as one kill event of
    Ray's memory monitor does): recovered in one pass, same metrics and final weights as the uninterrupted run."""
    trainer = make_trainer_module(tmp_path, sample_root, OVERRIDES)
    fired = []

    def hook(phase, step):
        if (phase, step) == ("learn", 1) and not fired:
            victims = [trainer.workers[0], trainer.learners.workers[1], _serve_controller()]
            fired.extend(actor_pid(v) for v in victims)
            for v in victims:
                sigkill(v)
    trainer.phase_hook = hook
    try:
        with caplog.at_level("WARNING"):
            history = trainer.run()
        weights = trainer.learners.state_dict_rank0()
    finally:
        trainer.shutdown()
    assert len(fired) == 3
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS)) and len(history) == STEPS
    bad = [x for a, b in zip(reference["rows"], rows) for x in _same_metrics(a, b)]
    assert not bad, bad
    for name, ref in reference["weights"].items():
        assert (weights[name] - ref).abs().max().item() <= 1e-6, name
    # one event, one pass: the learner group rebuilt once and the rollout actor's one death counted once
    assert trainer.learner_restarts == 1 and trainer.rollout_restarts == {0: 1}, (trainer.learner_restarts,
                                                                                   trainer.rollout_restarts)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("run failed") and "learner ranks dead: [1]" in m for m in messages), messages
    assert any(m.startswith("rollout actor 0 died (crashed") for m in messages), messages


# ------------------------------------------------------------------------------------------ Ray's memory monitor
OOM_DRIVER = """
import logging, os, subprocess, sys, threading
from configs.schema import load_config
from launch.train import connect_ray
from actors.driver.trainer import Trainer
from tests.conftest import TINY_TRAINER_OVERRIDES
from tests.test_kill_matrix import OVERRIDES, start_memory_hog

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
out, root, at_step, hold_s, fraction = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
cfg = load_config("tiny_cpu", [f"data.root={root}", f"run.output_root={out}", *TINY_TRAINER_OVERRIDES, *OVERRIDES,
                               "ray.num_cpus=4"])
connect_ray(cfg)                       # a private cluster: its raylet got this process's RAY_memory_* environment
trainer = Trainer(cfg)
hogs = []

def hook(phase, step):
    if (phase, step) == ("learn", at_step) and not hogs:
        hogs.append(start_memory_hog(fraction))           # held for hold_s, then stopped by its own handle
        threading.Timer(hold_s, hogs[0].stop).start()

try:
    trainer.setup()
    trainer.phase_hook = hook
    trainer.run()
finally:
    for h in hogs:
        h.stop()
    trainer.shutdown()
    import ray
    ray.shutdown()
print("HOG_USED", len(hogs), flush=True)
"""


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (what Ray's memory monitor reads on a host without a cgroup memory limit)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def used_fraction() -> float:
    """Node memory in use as Ray computes it: (MemTotal − MemAvailable) / MemTotal."""
    m = meminfo()
    return (m["MemTotal"] - m["MemAvailable"]) / m["MemTotal"]


class MemoryHog:
    """A child process holding ``nbytes`` of touched memory until :meth:`stop` (idempotent)."""

    CODE = ("import sys, time\nb = bytearray(int(sys.argv[1]))\nb[::4096] = b'x' * len(range(0, len(b), 4096))\n"
            "print('held', flush=True)\ntime.sleep(600)\n")

    def __init__(self, nbytes: int):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(max(nbytes, 0))], stdout=subprocess.PIPE,
                                     text=True)
        self.proc.stdout.readline()   # the memory is resident from here

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_memory_hog(fraction: float) -> MemoryHog:
    """A hog that brings the node's used memory to ``fraction`` of its total."""
    m = meminfo()
    return MemoryHog(int(fraction * m["MemTotal"] - (m["MemTotal"] - m["MemAvailable"])))


@pytest.mark.exclusive   # Ray's monitor reads the whole machine's memory: no other test may run meanwhile
def test_rays_memory_monitor_kills_during_a_run(reference, tmp_path, sample_root):
    """Ray's own memory monitor, armed through the private cluster's environment (threshold above the run's use,
    100 ms refresh), kills workers when a memory hog pushes the node over it at step 3: the run completes with the
    uninterrupted run's metrics and final weights, and the log names the cause: out of memory."""
    import subprocess
    import sys
    from pathlib import Path

    root_dir = Path(__file__).resolve().parents[1]
    threshold = min(0.9, used_fraction() + 0.25)   # far above the tiny run's use, far below the machine's size
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(root_dir), RAY_memory_usage_threshold=f"{threshold:.3f}",
               RAY_memory_monitor_refresh_ms="100")
    args = [sys.executable, "-c", OOM_DRIVER, str(tmp_path), str(sample_root), "2", "4.0", f"{threshold + 0.03:.3f}"]
    proc = subprocess.run(args, cwd=root_dir, env=env, capture_output=True, text=True, timeout=1500)
    log_text = proc.stdout + proc.stderr
    assert proc.returncode == 0, log_text[-6000:]
    assert "HOG_USED 1" in proc.stdout
    oom_lines = [ln for ln in log_text.splitlines() if "out_of_memory" in ln]
    assert oom_lines, log_text[-6000:]
    print("\nOOM log lines:\n" + "\n".join(ln[:400] for ln in oom_lines[:8]))
    _assert_like_reference(reference, next(tmp_path.glob("*/metrics.jsonl")).parent)
