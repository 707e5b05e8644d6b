"""Two Ray nodes on this machine (issue 16): learner ranks on one node, the rollout actor on the other, the weight
sync crossing between them; the node holding one role is removed mid-run and a fresh node added, and the run
recovers (a replaced rollout actor, or a learner group rebuilt from the last checkpoint) with each step once.

Runs in a subprocess with its own ``RAY_TMPDIR``: ``ray.cluster_utils.Cluster`` records its head as the machine's
"current cluster", which must not leak to other processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, logging, socket, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ray.cluster_utils import Cluster
    from ray._private.state import actors
    from configs.schema import load_config
    from tests.conftest import TINY_TRAINER_OVERRIDES

    out, data_root = sys.argv[1], sys.argv[2]
    # the reward pool stays on the head (serve.<expert>.resources, no CPU: the placement groups fill both nodes):
    # this test is about the learner and rollout nodes
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, node_ip_address="127.0.0.1",
                                                                resources={"reward_node": 10}))
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    # STRICT_PACK: the learner group (2 x 0.5 CPU) fills one node, so the rollout actor lands on the other
    cfg = load_config("tiny_cpu", [f"data.root={data_root}", f"run.output_root={out}", *TINY_TRAINER_OVERRIDES,
                                   "run.steps=4", "run.checkpoint_every=1", "run.image_grid_every=0",
                                   "placement.strategy=STRICT_PACK", f"serve.http_port={port}",
                                   f"ray.address={cluster.address}", "sync.timeout_s=30",
                                   *[f"serve.{e}.{k}" for e in ("tier", "ber", "der", "fer")
                                     for k in ("resources={reward_node: 0.01}", "num_cpus=0")]])
    from launch.train import connect_ray
    connect_ray(cfg)
    import ray
    from actors.driver.trainer import Trainer

    def node_of(handle):
        return actors(actor_id=handle._actor_id.hex())["Address"]["NodeID"]

    trainer = Trainer(cfg)
    trainer.setup()
    learner_node, rollout_node = node_of(trainer.learners.workers[0]), node_of(trainer.workers[0])
    victim = "learner" if learner_node == worker.node_id else "rollout"
    removed = []

    def hook(phase, step):
        if phase == "learn" and step == 2 and not removed:
            cluster.remove_node(worker, allow_graceful=False)   # the node and every process on it are gone
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            removed.append(step)

    trainer.phase_hook = hook
    try:
        history = trainer.run()
        result = {"learner_node": learner_node, "rollout_node": rollout_node, "worker_node": worker.node_id,
                  "victim": victim, "steps": [m["step"] for m in history],
                  "sync_s": [m["sync/seconds"] for m in history],
                  "rows": [json.loads(x)["step"] for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()],
                  "learner_restarts": trainer.learner_restarts, "rollout_restarts": trainer.rollout_restarts,
                  "new_rollout_node": node_of(trainer.workers[0]),
                  "new_learner_node": node_of(trainer.learners.workers[0])}
    finally:
        trainer.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result))
""")


def test_two_nodes_sync_across_and_survive_losing_a_node(tmp_path, sample_root):
    tmp = tempfile.mkdtemp(prefix="r16m", dir="/tmp")   # short: Ray's socket paths live under it
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(sample_root)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=1500)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-5000:]
        res = json.loads(lines[0][len("RESULT "):])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nMULTINODE", res)
    print("\n".join(x[:300] for x in out.stderr.splitlines() if "actors.driver.recovery" in x or "actors.driver.dispatch" in x))
    assert res["learner_node"] != res["rollout_node"]           # the roles sit on different nodes
    assert all(s > 0 for s in res["sync_s"])                    # and every step's weights crossed between them
    assert res["rows"] == [0, 1, 2, 3] and res["steps"][-1] == 3  # each step exactly once on disk
    if res["victim"] == "rollout":                              # replaced on the new node, learner kept
        assert res["learner_restarts"] == 0 and sum(res["rollout_restarts"].values()) >= 1
        assert res["new_rollout_node"] not in (res["worker_node"], res["learner_node"])
    else:                                                       # rebuilt from the last checkpoint
        assert res["learner_restarts"] >= 1 and res["new_learner_node"] != res["worker_node"]
