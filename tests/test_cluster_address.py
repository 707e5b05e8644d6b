"""Which Ray cluster a run uses is explicit: null address → a new private loopback cluster, never the one Ray has
recorded on the machine; an address / auto → join it without local-start arguments."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from actors.cluster.ray_env import LOCAL_ONLY_KEYS, is_loopback_address, ray_init_kwargs, resolve_address

ROOT = Path(__file__).resolve().parents[1]


def test_null_address_starts_local_and_joining_never_passes_local_only_arguments(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("local") is None
    local = ray_init_kwargs(resolve_address(None), num_cpus=2, num_gpus=0, include_dashboard=True,
                            metrics_export_port=9000)
    assert local["address"] == "local"          # never Ray's recorded "current cluster"
    assert local["_node_ip_address"] == "127.0.0.1" and local["dashboard_host"] == "127.0.0.1"
    assert local["num_cpus"] == 2 and local["_metrics_export_port"] == 9000
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # as under ray job submit
    assert resolve_address(None) == "10.1.2.3:6379"
    for address in ("auto", "10.1.2.3:6379", resolve_address(None)):
        joined = ray_init_kwargs(address, num_cpus=2, num_gpus=1, include_dashboard=True, metrics_export_port=9000)
        assert joined["address"] == address
        assert not set(LOCAL_ONLY_KEYS) & set(joined), joined


SCRIPT = textwrap.dedent("""
    import os, sys
    from ray._private.services import canonicalize_bootstrap_address
    recorded = canonicalize_bootstrap_address(None)        # what a bare ray.init() would join
    assert recorded == "10.255.255.1:6379", recorded
    import logging; logging.basicConfig(level=logging.INFO)
    from configs.schema import load_config
    from launch.train import connect_ray
    import ray
    cfg = load_config("tiny_cpu", ["ray.num_cpus=1"])
    info = connect_ray(cfg)
    print("GCS", info.address_info["gcs_address"])
    print("NODE", ray.util.get_node_ip_address())
    ray.shutdown()
""")


@pytest.mark.slow
def test_train_start_ignores_a_foreign_cluster_recorded_on_the_machine():
    tmp = tempfile.mkdtemp(prefix="r16", dir="/tmp")   # short: Ray's socket paths live under it
    try:
        recorded = Path(tmp, "ray", "ray_current_cluster")
        recorded.parent.mkdir(parents=True)
        recorded.write_text("10.255.255.1:6379")        # a cluster on another IP, as `ray start` records it
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("GCS", "NODE")))
        assert lines["GCS"].startswith("127.0.0.1:") and lines["NODE"] == "127.0.0.1"
        assert "starting a new private Ray cluster" in out.stderr
        assert recorded.read_text() == "10.255.255.1:6379"   # the record is left alone
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_loopback_addresses():
    assert all(map(is_loopback_address, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback_address, ["0.0.0.0", "::", "10.0.0.5", "::ffff:10.0.0.5"]))
