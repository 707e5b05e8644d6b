"""Private by default (issue 16): every TCP port a tiny run opens — Ray's GCS, raylet and agents, the rollout and
learner actors (weight-sync store, gloo), Serve's proxy and reward replicas — listens on loopback only."""
from __future__ import annotations

import os

import pytest

from actors.cluster.ray_env import is_loopback_address, listening_sockets

pytestmark = pytest.mark.slow


def test_every_port_of_a_tiny_run_listens_on_loopback(tmp_path, sample_root, make_shared_trainer):
    # the reward replicas are the session's shared pool's: processes of this cluster like the run's own would be
    trainer = make_shared_trainer(tmp_path, sample_root, ["run.steps=1", "run.image_grid_every=0"])
    try:
        trainer.run()
        sockets = listening_sockets(os.getpid())   # this process and its descendants: the whole local cluster
    finally:
        trainer.shutdown()
    print("\nLISTENING PORTS of a tiny run:")
    for s in sockets:
        print(f"  {s['address']}:{s['port']}  pid {s['pid']}  {s['name']}")
    names = " ".join(s["name"] for s in sockets)
    assert "ServeReplica" in names and "ProxyActor" in names and "RolloutWorker" in names
    exposed = [s for s in sockets if not is_loopback_address(s["address"])]
    assert not exposed, exposed
