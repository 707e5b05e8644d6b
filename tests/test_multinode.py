"""Two Ray nodes on this machine (issue 16): learner ranks on one node, the rollout actor on the other, the weight
sync crossing between them; the node holding one role is removed mid-run and a fresh node added, and the run
recovers with each step once. Both recovery paths run, each forced (issue 23): the nodes' CPU counts leave Ray one
placement only, so ``victim=rollout`` puts the rollout actor on the removed node (it is replaced on the new node, the
learner group kept) and ``victim=learner`` the learner group (rebuilt from the last checkpoint on the new node).

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
    from configs.schema import load_config
    from tests.conftest import TINY_TRAINER_OVERRIDES

    out, data_root, victim = sys.argv[1], sys.argv[2], sys.argv[3]
    # Placement is forced by CPU counts: the learner group is 2 ranks x 1.5 CPU in one STRICT_PACK group (3 CPUs on
    # one node), the rollout actor 2 CPUs. victim=rollout: head 4, worker 2 -> only the head holds the learner, then
    # only the worker the rollout actor. victim=learner: head 2, worker 4 -> only the worker holds the learner, then
    # only the head the rollout actor. The fresh node has the removed node's CPUs, and the survivor has no room for
    # the lost role, so the replacement / rebuilt group can only go to the fresh node.
    head_cpus, worker_cpus = (4, 2) if victim == "rollout" else (2, 4)
    # the reward pool stays on the head (serve.<expert>.resources, no CPU): this test is about learner and rollout
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=head_cpus, node_ip_address="127.0.0.1",
                                                                resources={"reward_node": 10}))
    worker = cluster.add_node(num_cpus=worker_cpus, node_ip_address="127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    cfg = load_config("tiny_cpu", [f"data.root={data_root}", f"run.output_root={out}", *TINY_TRAINER_OVERRIDES,
                                   "run.steps=4", "run.checkpoint_every=1", "run.image_grid_every=0",
                                   "placement.strategy=STRICT_PACK", "learner.num_cpus_per_rank=1.5",
                                   "rollout.num_cpus=2", f"serve.http_port={port}",
                                   f"ray.address={cluster.address}", "sync.timeout_s=30",
                                   *[f"serve.{e}.{k}" for e in ("tier", "ber", "der", "fer")
                                     for k in ("resources={reward_node: 0.01}", "num_cpus=0")]])
    from launch.train import connect_ray
    connect_ray(cfg)
    import ray
    from actors.driver.trainer import Trainer

    def node_of(handle):   # the node an actor runs on, asked of the actor itself (public API, no GCS internals)
        return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)

    trainer = Trainer(cfg)
    trainer.setup()
    learner_nodes = sorted({node_of(w) for w in trainer.learners.workers})
    learner_node, rollout_node = learner_nodes[0], node_of(trainer.workers[0])
    on_worker = "learner" if learner_node == worker.node_id else "rollout" if rollout_node == worker.node_id else None
    removed, fresh = [], []

    def hook(phase, step):
        if phase == "learn" and step == 2 and not removed:
            cluster.remove_node(worker, allow_graceful=False)   # the node and every process on it are gone
            fresh.append(cluster.add_node(num_cpus=worker_cpus, node_ip_address="127.0.0.1").node_id)
            removed.append(step)

    trainer.phase_hook = hook
    try:
        history = trainer.run()
        result = {"learner_nodes": learner_nodes, "rollout_node": rollout_node, "worker_node": worker.node_id,
                  "head_node": cluster.head_node.node_id, "fresh_node": fresh[0] if fresh else None,
                  "on_worker": on_worker, "steps": [m["step"] for m in history],
                  "sync_s": [m["sync/seconds"] for m in history],
                  "rows": [json.loads(x)["step"] for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()],
                  "learner_restarts": trainer.learner_restarts, "rollout_restarts": trainer.rollout_restarts,
                  "new_rollout_node": node_of(trainer.workers[0]),
                  "new_learner_nodes": sorted({node_of(w) for w in trainer.learners.workers})}
    finally:
        trainer.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.parametrize("victim", ["rollout", "learner"])
def test_two_nodes_sync_across_and_survive_losing_a_node(tmp_path, sample_root, victim):
    tmp = tempfile.mkdtemp(prefix="r16m", dir="/tmp")   # short: Ray's socket paths live under it
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(sample_root), victim], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=1500)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-5000:]
        res = json.loads(lines[0][len("RESULT "):])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nMULTINODE", res)
    print("\n".join(x[:300] for x in out.stderr.splitlines() if "actors.driver.supervisor" in x or "actors.rollout.pool" in x or "actors.driver.dispatch" in x))
    head, worker, fresh = res["head_node"], res["worker_node"], res["fresh_node"]
    assert res["on_worker"] == victim, res                      # the pinned placement, not Ray's choice
    assert len(res["learner_nodes"]) == 1                       # STRICT_PACK: the ranks share one node ...
    assert res["learner_nodes"][0] != res["rollout_node"]       # ... and the roles sit on different nodes
    assert all(s > 0 for s in res["sync_s"])                    # and every step's weights crossed between them
    assert res["rows"] == [0, 1, 2, 3] and res["steps"][-1] == 3  # each step exactly once on disk
    assert fresh not in (None, head, worker)
    if victim == "rollout":                                     # replaced on the new node, learner group kept
        assert res["learner_restarts"] == 0 and sum(res["rollout_restarts"].values()) >= 1, res
        assert res["learner_nodes"] == res["new_learner_nodes"] == [head]
        assert res["new_rollout_node"] == fresh
    else:                                                       # rebuilt from the last checkpoint on the new node
        assert res["learner_restarts"] >= 1 and sum(res["rollout_restarts"].values()) == 0, res
        assert res["new_learner_nodes"] == [fresh] and res["new_rollout_node"] == res["rollout_node"] == head
