"""`ray job submit` of the tiny config to a `ray start --head` cluster on loopback (the cluster deployment path).

The head runs in its own process session with its own --temp-dir and free ports, so it never clashes with the
test session's cluster (or anyone else's). It is stopped by signalling exactly the processes it started (never
`ray stop`, which kills every Ray process on the machine).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_under(temp_dir: str) -> list[int]:
    """PIDs whose command line mentions our private Ray temp dir (the head's daemons and workers)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                pids.append(proc.info["pid"])
        except psutil.Error:
            continue
    return pids


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the blocking `ray start` (it tears its cluster down), then anything of ours still alive."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        pids = [p for p in _processes_under(temp_dir) if p != os.getpid()]
        try:
            pids += [-os.getpgid(head.pid)]
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                (os.killpg(-pid, sig) if pid < 0 else os.kill(pid, sig))
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(pause)


def test_ray_job_submit_runs_the_tiny_config(tmp_path, sample_root):
    data = sample_root
    out = tmp_path / "runs"
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")   # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client, agent_http, agent_grpc, metrics, serve_http = _free_ports(7)
    # token auth on (Ray 2.60's default for new clusters); the CLI client must be told so explicitly
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "4", "--num-gpus", "0",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and head.poll() is None:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:   # 401 without a token: the dashboard is up
                break
            except OSError:
                time.sleep(1.0)
        assert head.poll() is None, head.stdout.read()[-3000:]
        runtime_env = {"excludes": ["/.venv", "/data", "/runs", "/.git", "__pycache__", "/.pytest_cache"]}
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "-m", "launch.train", "--config", "configs/tiny_cpu.yaml", "run.steps=1",
             "run.checkpoint_every=1", "run.image_grid_every=1", f"run.output_root={out}", f"data.root={data}",
             f"serve.http_port={serve_http}", "rollout.group_size=3", "sampler.timesteps=8", "dsog.screen_step=3",
             "rollout.answer_max_new_tokens=8"],
            env=env, capture_output=True, text=True, timeout=480)
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "run folder:" in log
    finally:
        _stop_head(head, temp_dir)
    run = out / "tiny-cpu"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    assert (run / "checkpoints" / "step_000001" / "COMPLETE").exists()
    assert (run / "images" / "step_000001.png").exists() and (run / "reward_curves.png").exists()
    assert any((run / "final").iterdir())
    assert not _processes_under(temp_dir), "Ray processes of the test cluster survived"
    shutil.rmtree(temp_dir, ignore_errors=True)
