"""The README's cluster lines, run as written: `ray start --head` and `ray job submit --runtime-env
configs/runtime_env.yaml -- python -m launch.train ...` of the tiny config, from a shell whose PATH does not hold the
project's environment; then `ray job logs` and a live scrape of the metrics endpoint against the shipped Grafana
dashboard.

The lines are read from the README's "Start Ray and submit the job" block. The only changes: free ports, a private
--temp-dir and --block for the head (so it never clashes with other clusters on the machine), the test's run folder
and dataset, and a smaller model for speed. The head is stopped by signalling exactly the processes it started
(never `ray stop`, which kills every Ray process on the machine).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.operator_head import free_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


VENV = BIN.parent
DASHBOARD = REPO / "dashboards" / "grafana_grpo.json"


def readme_cluster_lines() -> dict[str, str]:
    """The README's export / ray start / first ray job submit lines (continuations joined)."""
    text = (REPO / "README.md").read_text()
    block = text.split("**Start Ray and submit the job.**", 1)[1].split("```", 2)[1]
    lines = block.replace("\\\n", " ").splitlines()
    out = {}
    for line in (x.split("#", 1)[0].strip() for x in lines):
        for key, marker in (("export", "export "), ("token", "get-auth-token"), ("start", "ray start"),
                            ("submit", "ray job submit")):
            if marker in line and key not in out:
                out[key] = re.sub(r"\s+", " ", line)
    assert set(out) == {"export", "token", "start", "submit"}, out
    return out


def dashboard_series() -> set[str]:
    """Every metric name a query of the shipped Grafana dashboard reads."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return {m for e in exprs for m in re.findall(r"\bray_[a-z0-9_]+(?=\s*[{,])", e)}   # names, not the ray_job_id label


def scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def series_of(text: str) -> dict[str, list[str]]:
    """metric name -> its sample lines."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            out.setdefault(re.split(r"[{ ]", line, 1)[0], []).append(line)
    return out


def clean_env() -> dict[str, str]:
    """The caller's environment without the project's environment on PATH (and no active virtualenv)."""
    venv = str(VENV)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not p.startswith(venv)
            and ".venv" not in p]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=os.pathsep.join(path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return env


def test_readme_submit_lines_run_the_tiny_config(tmp_path, sample_root):
    lines = readme_cluster_lines()
    out = tmp_path / "runs"
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")   # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client, agent_http, agent_grpc, metrics, serve_http = free_ports(7)
    env = dict(clean_env(), HOME=str(tmp_path / "home"))   # ~/.ray/auth_token is the test's own (README token line)
    (tmp_path / "home").mkdir()
    probe = subprocess.run(["bash", "-c", "command -v python || true"], env=env, capture_output=True, text=True)
    assert not probe.stdout.strip().startswith(str(VENV)), "the test shell must not have the venv on PATH"
    # `export UNICTASK_VENV=$PWD/.venv ...`: here the environment lives elsewhere, so point the variable at it
    exports = lines["export"].replace("$PWD/.venv", shlex.quote(str(VENV)))
    start = lines["start"].replace("--metrics-export-port 8080", f"--metrics-export-port {metrics}") + (
        f" --port {gcs} --dashboard-port {dash} --ray-client-server-port {client}"
        f" --dashboard-agent-listen-port {agent_http} --dashboard-agent-grpc-port {agent_grpc}"
        f" --num-cpus 4 --num-gpus 0 --temp-dir {temp_dir} --disable-usage-stats --block")
    submit = lines["submit"].replace("127.0.0.1:8265", f"127.0.0.1:{dash}").replace(
        "run.output_root=$PWD/runs", f"run.output_root={out}") + (
        f" data.root={sample_root} serve.http_port={serve_http} rollout.group_size=3 sampler.timesteps=8"
        " dsog.screen_step=3 rollout.answer_max_new_tokens=8 run.checkpoint_every=1 run.image_grid_every=1")
    assert "--runtime-env configs/runtime_env.yaml" in submit and " python -m launch.train " in submit
    head = subprocess.Popen(["bash", "-c", f"{exports} && {lines['token']} && exec {start}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    seen: dict[str, list[str]] = {}
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
        job = subprocess.Popen(["bash", "-c", f"{exports} && {submit}"], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        job_out: list[str] = []
        reader = threading.Thread(target=lambda: job_out.extend(job.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 480
        while job.poll() is None and time.monotonic() < deadline:   # scrape while the job runs
            for name, samples in series_of(scrape(metrics)).items():
                seen.setdefault(name, []).extend(samples)
            time.sleep(2.0)
        if job.poll() is None:
            job.kill()
        reader.join(timeout=10)
        log = "".join(job_out)
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        sub = re.search(r"raysubmit_\w+", log).group(0)
        logs = subprocess.run(["bash", "-c", f"{exports} && $UNICTASK_VENV/bin/ray job logs --address {address} "
                               f"{sub}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60).stdout
        for name, samples in series_of(scrape(metrics)).items():   # counters outlive the job
            seen.setdefault(name, []).extend(samples)
    finally:
        _stop_head(head, temp_dir)
        if not _processes_under(temp_dir):
            shutil.rmtree(temp_dir, ignore_errors=True)
    print("submit:", submit, "\n--- submit output (tail) ---\n" + log[-1500:] + "\n--- ray job logs ---\n" + logs)
    # the job log: one line per role, then the step table (N/total, elapsed, ETA, time of day, concept)
    for role in ("rewards:", "learner:", "rollout:"):
        assert any(role in line and "ready in" in line for line in logs.splitlines()), (role, logs[-3000:])
    header = next(line for line in logs.splitlines() if line.split()[:2] == ["step", "reward"])
    assert header.split()[-4:] == ["elapsed", "eta", "time", "concept"]
    rows = [line.split() for line in logs.splitlines() if re.match(r"\s*\d+/2\s", line)]
    assert [r[0] for r in rows] == ["1/2", "2/2"], logs[-3000:]
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", r[-2]) and r[-1] != "-" for r in rows)
    assert "run folder:" in logs
    assert len([line for line in logs.splitlines() if "ServeReplica" in line or "ServeController" in line]) < 5
    run = out / "tiny-cpu"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").exists()
    assert (run / "images" / "step_000002.png").exists() and (run / "reward_curves.png").exists()
    assert any((run / "final").iterdir())
    # metrics: every series the Grafana dashboard queries was on the live endpoint, labelled with run and job
    names = set(seen)
    scraped = names | {n.rsplit("_", 1)[0] for n in names if n.endswith(("_bucket", "_count", "_sum"))}
    missing = sorted(m for m in dashboard_series() if m not in scraped)
    assert not missing, (missing, sorted(n for n in names if n.startswith(("ray_grpo", "ray_reward"))))
    for name in ("ray_grpo_reward_total", "ray_grpo_steps_total", "ray_reward_serve_replicas"):
        assert any('run="tiny-cpu"' in x and 'ray_job_id="' in x for x in seen[name]), seen[name][:3]
    (tmp_path / "scraped_series.txt").write_text("\n".join(sorted(names)))
    for name in sorted(n for n in names if n.startswith(("ray_grpo", "ray_reward"))):
        print("scraped:", seen[name][-1])
    assert not _processes_under(temp_dir), "Ray processes of the test cluster survived"
