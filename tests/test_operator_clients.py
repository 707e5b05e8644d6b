"""Every operator promise of the README under the real clients (issue 24).

The README's "Start Ray and submit the job" lines run as written (export, token, `ray start`; then the first
`ray job submit` of a tiny run) on a private head: its own HOME (so ``~/.ray/auth_token`` is the test's), temp dir
and ports, plus ``--block`` so that the head is stopped by its own process, never `ray stop`. Against it:

- every listening socket of the head's process tree (the job's driver, actors, Serve proxy and replicas included)
  is on loopback, listed with `ss -ltnp`;
- the job API answers the README's `curl -H "Authorization: Bearer ..."` line, refuses without the token, and a
  browser's way (``/api/authenticate`` → cookie) works; the token file is mode 600;
- a real Prometheus (Debian's package) runs with Ray's generated scrape config of this head
  (``<temp dir>/session_latest/metrics/prometheus/prometheus.yml``); every query of the Grafana dashboard, with the
  variables substituted as Grafana does, returns data through Prometheus' HTTP API; after the run the gauges age
  out of the endpoint and the counters stay, as the README says;
- the run's MLflow store opens with the README's `mlflow server` line and its REST API returns the run's metrics.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from actors.cluster.ray_env import is_loopback_address, listening_sockets
from operator_head import (REPO, VENV, clean_env, cluster_lines, dashboard_queries, free_ports, grafana_regex_value,
                           http, processes_under, prom_api, readme_block, ss_address, ss_listing, start_prometheus,
                           stop_group, stop_head, substitute, tree_pids, wait_http, with_venv)

pytestmark = pytest.mark.slow

STEPS = 20
"""Training steps of the submitted run: rewards are scored across several 10 s report + scrape cycles even on a
fast machine (a rate() needs two different scraped values of a counter)."""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The README's head lines run on a private head; yields ports, env, paths and the real Prometheus."""
    base = tmp_path_factory.mktemp("operator")
    home = base / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rayop", dir="/tmp")   # short: Ray's socket paths must stay < 108 chars
    (gcs, dash, client, agent_http, agent_grpc, metrics, autoscaler_m, dashboard_m, prom,
     mlflow_port) = free_ports(10)
    # Ray's autoscaler / dashboard metrics ports are fixed (44217 / 44227) unless set: another head on this machine
    # may hold them (README, "Stopping the head")
    env = clean_env(home, {"AUTOSCALER_METRIC_PORT": str(autoscaler_m), "DASHBOARD_METRIC_PORT": str(dashboard_m)})
    lines = cluster_lines()
    *setup, start = [with_venv(x) for x in lines["head"]]
    assert start.startswith("$UNICTASK_VENV/bin/ray start --head --node-ip-address 127.0.0.1"), start
    start = start.replace("--metrics-export-port 8080", f"--metrics-export-port {metrics}") + (
        f" --port {gcs} --dashboard-port {dash} --ray-client-server-port {client}"
        f" --dashboard-agent-listen-port {agent_http} --dashboard-agent-grpc-port {agent_grpc}"
        f" --num-cpus 4 --num-gpus 0 --temp-dir {temp_dir} --disable-usage-stats --block")
    log = (base / "head.log").open("w")
    proc = subprocess.Popen(["bash", "-c", " && ".join([*setup, f"exec {start}"])], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = None
    info = dict(proc=proc, env=env, home=home, temp_dir=temp_dir, base=base, dash=dash, metrics=metrics,
                gcs=gcs, client=client, prom=prom, mlflow_port=mlflow_port, setup=setup)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 180, proc=proc)   # 401 without a token: it is up
        config = Path(temp_dir) / "session_latest" / "metrics" / "prometheus" / "prometheus.yml"
        deadline = time.monotonic() + 60
        while not config.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
        assert config.exists(), f"Ray wrote no scrape config at {config}"
        info["prom_config"] = config
        prometheus = start_prometheus(config, prom, base / "tsdb", base / "prometheus.log")
        info["prometheus"] = prometheus
        yield info
    finally:
        if prometheus is not None:
            stop_group(prometheus)
        stop_head(proc, temp_dir)
        log.close()
        if not processes_under(temp_dir):
            shutil.rmtree(temp_dir, ignore_errors=True)
        print("--- head log (tail) ---\n" + (base / "head.log").read_text()[-1500:])


def _api_headers(head) -> dict[str, str]:
    token = (head["home"] / ".ray" / "auth_token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _check_loopback(head, label: str) -> list[dict]:
    sockets = listening_sockets(head["proc"].pid)
    listing = ss_listing(tree_pids(head["proc"].pid))
    print(f"\n`ss -ltnp` of the head's process tree ({label}):\n  " + "\n  ".join(listing))
    assert listing, "ss listed no socket of the head"
    exposed = [line for line in listing if ss_address(line) == "*" or not is_loopback_address(ss_address(line))]
    exposed += [s for s in sockets if not is_loopback_address(s["address"])]
    assert not exposed, exposed
    return sockets


def test_the_readme_head_listens_on_loopback_only(head):
    want = {head["gcs"], head["dash"], head["metrics"], head["client"]}
    deadline = time.monotonic() + 90   # the agents and the client server come up after the dashboard
    while time.monotonic() < deadline and not want <= {s["port"] for s in listening_sockets(head["proc"].pid)}:
        time.sleep(2.0)
    sockets = _check_loopback(head, "idle head")
    ports = {s["port"] for s in sockets}
    assert want <= ports, (sorted(want - ports), sorted(ports))


def test_job_api_answers_the_documented_token_header(head):
    token_file = head["home"] / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600, oct(token_file.stat().st_mode)
    assert token_file.parent.stat().st_mode & 0o077 == 0, oct(token_file.parent.stat().st_mode)
    url = f"http://127.0.0.1:{head['dash']}/api/jobs/"
    assert http(url)[0] == 401
    assert http(url, headers={"Authorization": "Bearer not-the-token"})[0] == 403
    curl = next(x for x in readme_block("**The token.**") if x.startswith("curl "))
    curl = curl.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{head['dash']}")
    out = subprocess.run(["bash", "-c", curl + " -sS --fail"], env=head["env"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (curl, out.stderr)
    assert isinstance(json.loads(out.stdout), list), out.stdout[:300]
    # a browser: the dashboard's prompt posts the token once, an HttpOnly cookie carries it afterwards
    status, body, headers = http(f"http://127.0.0.1:{head['dash']}/api/authenticate", headers=_api_headers(head),
                                 data=b"")
    assert status == 200, body
    cookie = headers.get("Set-Cookie", "")
    assert cookie.startswith("ray-authentication-token=") and "HttpOnly" in cookie, cookie
    assert http(url, headers={"Cookie": cookie.split(";", 1)[0]})[0] == 200


@pytest.fixture(scope="module")
def tiny_job(head, sample_root):
    """The README's first `ray job submit` line on the head (a tiny run with the MLflow tracker), watched while it
    runs; returns the run folder, submission and Ray job ids and the sockets seen while it ran."""
    run_name = f"op-{uuid.uuid4().hex[:6]}"
    out_root = head["base"] / "runs"
    submit = with_venv(cluster_lines()["submit"]).replace("127.0.0.1:8265", f"127.0.0.1:{head['dash']}")
    assert "run.output_root=$PWD/runs" in submit and "run.steps=2" in submit, submit
    submit = submit.replace("run.output_root=$PWD/runs", f"run.output_root={out_root}").replace(
        "run.steps=2", f"run.steps={STEPS}") + (
        f" data.root={sample_root} run.name={run_name} rollout.group_size=3 sampler.timesteps=8 dsog.screen_step=3"
        " rollout.answer_max_new_tokens=8 run.image_grid_every=0 run.checkpoint_every=100"
        " 'run.trackers=[tensorboard,mlflow]'")
    t0 = time.time()
    job = subprocess.Popen(["bash", "-c", " && ".join([*head["setup"][:1], submit])], cwd=REPO, env=head["env"],
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    seen_sockets: list[dict] = []
    listing: list[str] = []
    deadline = time.monotonic() + 600
    while job.poll() is None and time.monotonic() < deadline:
        try:
            socks = listening_sockets(head["proc"].pid)
            names = " ".join(s["name"] for s in socks)
            if "ServeReplica" in names and "RolloutWorker" in names and len(socks) > len(seen_sockets):
                seen_sockets = socks
                listing = ss_listing(tree_pids(head["proc"].pid))
        except Exception:   # noqa: BLE001 - a process ended while being listed: try again
            pass
        time.sleep(3.0)
    if job.poll() is None:
        stop_group(job)
    reader.join(timeout=10)
    log = "".join(lines)
    assert job.returncode == 0 and "succeeded" in log, log[-4000:]
    sub = re.search(r"raysubmit_\w+", log).group(0)
    jobs = json.loads(http(f"http://127.0.0.1:{head['dash']}/api/jobs/", headers=_api_headers(head))[1])
    job_id = next(j["job_id"] for j in jobs if j.get("submission_id") == sub)
    return dict(run=out_root / run_name, run_name=run_name, submission=sub, job_id=job_id, start=t0,
                end=time.time(), sockets=seen_sockets, ss=listing, log=log)


def test_the_running_job_listens_on_loopback_only(head, tiny_job):
    socks, listing = tiny_job["sockets"], tiny_job["ss"]
    print("\n`ss -ltnp` of the head's process tree while the job ran:\n  " + "\n  ".join(listing))
    names = " ".join(s["name"] for s in socks)
    assert "ServeReplica" in names and "ProxyActor" in names and "RolloutWorker" in names, names
    exposed = [line for line in listing if ss_address(line) == "*" or not is_loopback_address(ss_address(line))]
    exposed += [s for s in socks if not is_loopback_address(s["address"])]
    assert not exposed, exposed


def _finite(result: list[dict]) -> int:
    return sum(1 for series in result for _, v in series["values"] if math.isfinite(float(v)))


def test_every_dashboard_query_returns_data_under_a_real_prometheus(head, tiny_job):
    port, run, job_id = head["prom"], tiny_job["run_name"], tiny_job["job_id"]
    time.sleep(12)   # one more scrape of the endpoint after the job ended
    # the variables as Grafana resolves them: label_values() through the label-values API
    runs = prom_api(port, "label/run/values", **{"match[]": "ray_grpo_steps_total"})["data"]
    assert run in runs, runs
    selector = f'ray_grpo_steps_total{{run=~"{grafana_regex_value(run)}"}}'
    job_ids = prom_api(port, "label/ray_job_id/values", **{"match[]": selector})["data"]
    assert job_ids == [job_id], (job_ids, job_id)
    renamed = prom_api(port, "query", query='count({__name__=~"ray_(grpo|reward_serve)_.+", exported_job!=""})')
    assert renamed["data"]["result"] == [], renamed
    start = tiny_job["start"] - 30
    deadline = time.time() + 60   # shared by every query: an empty one waits for more scrapes, 60 s in all
    table, empty = [], []
    for variables, label in (({"run": grafana_regex_value(run), "ray_job_id": grafana_regex_value(job_id)},
                              "selected"), ({"run": grafana_regex_value(run), "ray_job_id": ".*"}, "All jobs")):
        for title, ref, expr in dashboard_queries():
            query = substitute(expr, variables)
            # a rate() needs two scrapes of its series: a series first exported near the job's end (the rollout
            # actors' client-side histograms) gets more scrapes (counters and histograms stay on the endpoint after
            # the job) before its query counts as empty
            while True:
                result = prom_api(port, "query_range", query=query, start=f"{start:.0f}", end=f"{time.time():.0f}",
                                  step="15")["data"]["result"]
                finite = _finite(result)
                if finite or time.time() > deadline:
                    break
                time.sleep(10)
            table.append((label, title, ref, len(result), finite, query))
            if not finite:
                empty.append((label, title, ref, query))
    print(f"\nDashboard queries under Prometheus (run {run}, ray_job_id {job_id}, {STEPS} steps):")
    print(f"{'variables':10} | {'panel':38} | ref | series | points | query")
    for label, title, ref, n, finite, query in table:
        print(f"{label:10} | {title[:38]:38} | {ref:3} | {n:6} | {finite:6} | {query}")
    (head["base"] / "dashboard_queries.txt").write_text("\n".join("\t".join(map(str, r)) for r in table))
    assert len(table) == 2 * len(dashboard_queries()) >= 76
    assert not empty, empty


def test_finished_run_gauges_age_out_and_counters_stay(head, tiny_job):
    run = tiny_job["run_name"]

    def ours() -> list[str]:
        text = http(f"http://127.0.0.1:{head['metrics']}/metrics", timeout=10)[1].decode()
        return [x for x in text.splitlines() if f'run="{run}"' in x and not x.startswith("#")]

    deadline = tiny_job["end"] + 90
    while time.time() < deadline and any(x.startswith("ray_grpo_reward_total{") for x in ours()):
        time.sleep(2.0)
    gone_after = time.time() - tiny_job["end"]
    left = ours()
    print(f"\ngauges of run {run} gone {gone_after:.0f} s after the job ended; left on the endpoint:")
    print("\n".join(sorted({x.split("{", 1)[0] for x in left})))
    assert not any(x.startswith("ray_grpo_reward_total{") for x in left), gone_after
    steps = [x for x in left if x.startswith("ray_grpo_steps_total{")]
    assert steps and float(steps[0].rsplit(" ", 1)[1]) == STEPS, steps
    assert f'ray_job_id="{tiny_job["job_id"]}"' in steps[0] and "exported_job" not in steps[0]


def test_mlflow_server_serves_the_runs_metrics(head, tiny_job):
    run = tiny_job["run"]
    assert (run / "mlflow.db").is_file(), sorted(p.name for p in run.iterdir())
    line = readme_block("**Experiment trackers.**")[0]
    assert "mlflow server --backend-store-uri sqlite:///$RUN/mlflow.db" in line and "--host 127.0.0.1" in line, line
    line = line.replace("$UNICTASK_VENV", shlex.quote(str(VENV))).replace("$RUN", shlex.quote(str(run))).replace(
        "--port 5000", f"--port {head['mlflow_port']}")
    log = (head["base"] / "mlflow.log").open("w")
    server = subprocess.Popen(["bash", "-c", f"exec {line}"], env=head["env"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    api = f"http://127.0.0.1:{head['mlflow_port']}/api/2.0/mlflow"
    try:
        wait_http(f"http://127.0.0.1:{head['mlflow_port']}/health", 180, ok=lambda s: s == 200, proc=server)
        status, body, _ = http(f"{api}/experiments/get-by-name?experiment_name=unictask-grpo", timeout=60)
        assert status == 200, body
        exp_id = json.loads(body)["experiment"]["experiment_id"]
        status, body, _ = http(f"{api}/runs/search", headers={"Content-Type": "application/json"},
                               data=json.dumps({"experiment_ids": [exp_id]}).encode(), timeout=60)
        assert status == 200, body
        (mrun,) = json.loads(body)["runs"]
        run_id = mrun["info"]["run_id"]
        assert mrun["info"]["run_name"] == tiny_job["run_name"] and mrun["info"]["status"] == "FINISHED", mrun
        key = urllib.parse.quote("reward/total", safe="")
        status, body, _ = http(f"{api}/metrics/get-history?run_id={run_id}&metric_key={key}", timeout=60)
        assert status == 200, body
        history = sorted(json.loads(body)["metrics"], key=lambda m: m["step"])
        status, arts, _ = http(f"{api}/artifacts/list?run_id={run_id}", timeout=60)
    finally:
        stop_group(server)
        log.close()
    print(f"\nMLflow REST {api}/metrics/get-history?run_id={run_id}&metric_key=reward/total ->\n"
          + json.dumps({"metrics": history[:3] + (["..."] if len(history) > 3 else [])}, indent=1))
    print(f"artifacts/list -> {arts.decode()[:400]}")
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["value"]) for m in history] == [(r["step"], pytest.approx(r["reward/total"]))
                                                          for r in logged]
    assert len(history) == STEPS
    assert status == 200 and "config.json" in arts.decode(), arts[:400]


def test_scale_names_its_cluster_or_refuses_with_the_list(head):
    from launch.scale import ray_clusters

    ours = f"127.0.0.1:{head['gcs']}"

    def scale(*args: str) -> subprocess.CompletedProcess:
        cmd = " && ".join([*head["setup"][:1], "$UNICTASK_VENV/bin/python -m launch.scale --status " + " ".join(args)])
        return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=head["env"], capture_output=True, text=True,
                              timeout=180)

    out = scale("--address", ours)   # after the run: its applications and Serve are gone, so nothing is deployed
    assert out.returncode == 0 and out.stdout.splitlines() == [f"cluster {ours}, applications rewards-<expert>",
                                                              "{}"], (out.stdout, out.stderr[-2000:])
    assert "There is no Serve instance running" in out.stderr and "Traceback" not in out.stderr, out.stderr
    clusters = [c["address"] for c in ray_clusters()]
    assert ours in clusters, clusters
    out = scale()   # no address: the only cluster, or a refusal naming every cluster on the machine
    print(f"\nlaunch.scale --status without --address, {len(clusters)} cluster(s) here:\n{out.stdout}{out.stderr}")
    if out.returncode == 0:   # other clusters on the machine may come and go meanwhile: either way, ours is named
        assert out.stdout.startswith(f"cluster {ours},"), out
    else:
        assert out.returncode == 2 and "pick one with --address" in out.stderr and ours in out.stderr, out
