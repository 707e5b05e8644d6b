"""Operator defaults without a cluster (issue 24): the Grafana dashboard's import format and labels, metric labels
Prometheus leaves alone, the pictures (1-based steps, legend of scoring experts, whole captions), a shared host
(free Serve port, launch.scale's cluster choice, launch.evaluate's and injection's run folders) and the MLflow store
in the run folder."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "dashboards" / "grafana_grpo.json"
GRAFANA_UNITS = {"none", "short", "s", "ms", "percentunit", "percent", "reqps", "ops", "bytes"}
DS = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_is_a_grafana_import_with_a_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int) and dash["panels"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("run", "ray_job_id"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DS and v["includeAll"] and v["multi"], v
        assert v["definition"] == v["query"]["query"] and v["definition"].startswith("label_values(")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), ids
    for p in dash["panels"]:
        assert p["datasource"] == DS, p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24, (p["title"], g)
        unit = p["fieldConfig"]["defaults"]["unit"]
        assert unit in GRAFANA_UNITS, (p["title"], unit)
        if p["title"].startswith(("Time per phase", "Reward latency")):
            assert unit == "s", p["title"]
        if "pass rate" in p["title"]:
            assert unit == "percentunit"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", DS) == DS
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= set(variables) and {"run", "ray_job_id"} <= used, t["expr"]
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]] + [v["definition"] for v in
                                                                          variables.values() if "definition" in v]
    for q in queries:   # Prometheus owns job / instance: a matcher on them would never see the service's labels
        assert not re.search(r"(?<![\w])(job|instance|exported_job)\s*(=|!=|=~|!~)", q), q
        assert not re.search(r"\b(job|instance)\)\s*$", q), q
    assert len(queries) >= 40


def test_metric_labels_are_not_the_ones_prometheus_owns():
    from actors.telemetry.prometheus import LABELS, run_labels

    assert LABELS == ("run", "ray_job_id")
    labels = run_labels("r1")
    assert set(labels) == {"run", "ray_job_id"} and labels["run"] == "r1"
    assert not {"job", "instance"} & set(LABELS)


def test_reward_curves_use_the_logs_step_numbers_and_only_scoring_experts():
    import matplotlib.pyplot as plt

    from actors.telemetry.pictures import reward_curves_figure, scored_experts

    records = [{"step": s, "reward/total": 0.1 * s, "reward/std": 0.01, "reward/tier": 0.3, "reward/der": 0.2 + s,
                "reward/fer": math.nan} for s in range(3)]
    assert scored_experts(records) == ["reward/der", "reward/tier"]
    fig = reward_curves_figure(records, "t")
    try:
        ax = fig.axes[0]
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "fer" not in legend and {"total", "tier", "der"} <= set(legend), legend
    finally:
        plt.close(fig)


def test_grid_captions_are_wrapped_not_cut(tmp_path):
    from actors.telemetry.pictures import caption_lines, display_prompt, save_image_grid

    prompt = ("A photo of <token_0><token_1><astro>.\nShe is an astronaut who trained for years before her first "
              "flight and now walks on the surface of the moon holding a small flag in her left hand zzzend")
    samples = [SimpleNamespace(concept=c, sample_index=i, reward=0.5, advantage=0.01 * i, prompt_text=prompt,
                               image=np.full((16, 16, 3), 40 * i, np.uint8)) for c in ("astro", "chelsea")
               for i in range(2)]
    lines = caption_lines(samples[0], 20)
    assert all(len(x) <= 20 for x in lines)
    assert " ".join(lines[1:]).split() == display_prompt(prompt).split()   # every word, nothing cut
    short = Image.open(save_image_grid(tmp_path / "a.png", [SimpleNamespace(**{**vars(samples[0]),
                                                                               "prompt_text": "A cat."})], cell=64))
    full = Image.open(save_image_grid(tmp_path / "b.png", samples[:1], cell=64))
    assert full.size[1] >= short.size[1] + (len(lines) - 4) * 11


def test_serve_http_port_is_free_by_default():
    from configs.schema import load_config
    from configs.serve import ServeConfig

    assert ServeConfig().http_port == 0 and ServeConfig.tiny().http_port == 0
    assert load_config("tiny_cpu", []).serve.http_port == 0
    assert load_config("tiny_cpu", ["serve.http_port=8123"]).serve.http_port == 8123


def test_scale_picks_one_cluster_or_refuses_with_the_list():
    from launch.scale import pick_cluster, ray_clusters

    two = [{"address": "127.0.0.1:6379", "session_dir": "/tmp/ray/session_a", "started": "2026-12-05 10:00:00"},
           {"address": "127.0.0.1:6380", "session_dir": "/tmp/x/session_b", "started": "2026-12-05 11:00:00"}]
    assert pick_cluster("10.0.0.2:6379", None, two) == "10.0.0.2:6379"
    assert pick_cluster(None, "127.0.0.1:6380", two) == "127.0.0.1:6380"
    assert pick_cluster(None, None, two[1:]) == "127.0.0.1:6380"
    for address in (None, "auto"):
        with pytest.raises(ValueError, match=r"2 Ray clusters run on this machine, pick one with --address: "
                                             r"127\.0\.0\.1:6379 \(session session_a.*127\.0\.0\.1:6380"):
            pick_cluster(address, None, two)
    with pytest.raises(ValueError, match="no Ray cluster is running"):
        pick_cluster("auto", "auto", [])
    assert all(set(c) >= {"address", "session_dir", "pid", "started"} for c in ray_clusters())


def test_evaluate_writes_into_the_run_folder_by_default(tmp_path):
    from configs.schema import load_config
    from launch.evaluate import default_out_dir, parse_args

    run = tmp_path / "runs" / "r1"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {name: r1}\n")
    step = run / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    cfg = load_config("tiny_cpu", [f"run.output_root={tmp_path / 'other'}"])
    assert parse_args(["--checkpoint", str(run / "final")]).out is None
    assert default_out_dir(str(run / "final"), cfg) == run / "eval" / "final"
    assert default_out_dir(str(step), cfg) == run / "eval" / "step_000002"
    assert default_out_dir(str(run), cfg) == run / "eval" / "latest"
    assert default_out_dir(None, cfg) == tmp_path / "other" / "tiny-cpu" / "eval" / "config"


def test_the_printed_grpo_line_has_its_own_run_folder(tmp_path):
    from configs.inject import load_inject_config
    from launch.inject import grpo_command

    cfg = load_inject_config("inject_tiny", [f"run.output_root={tmp_path}", "run.name=inj7"])
    argv = shlex.split(grpo_command(cfg, ["data.root=/d", "data.concepts=[c]"]))
    assert argv[:5] == ["python", "-m", "launch.train", "--config", "configs/tiny_cpu.yaml"]
    assert f"run.output_root={tmp_path}" in argv and "run.name=inj7-grpo" in argv and "data.root=/d" in argv


def test_mlflow_store_is_sqlite_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from actors.telemetry.trackers import make_trackers, mlflow_store_uri
    from configs.trackers import TrackerConfig

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    run.mkdir()
    (tracker,) = make_trackers(SimpleNamespace(name="r", trackers=["mlflow"], tracker=TrackerConfig()), run,
                               {"run": {"name": "r"}})
    tracker.log_scalars(0, {"reward/total": 0.25})
    png = run / "curves.png"
    Image.new("RGB", (4, 4)).save(png)
    tracker.log_image("reward_curves", png, 0)
    tracker.close()
    assert mlflow_store_uri(run) == f"sqlite:///{run}/mlflow.db" and (run / "mlflow.db").is_file()
    client = MlflowClient(mlflow_store_uri(run))
    (mrun,) = client.search_runs([client.get_experiment_by_name("unictask-grpo").experiment_id])
    assert mrun.data.metrics == {"reward/total": 0.25}
    assert list((run / "mlflow-artifacts").rglob("curves.png")) and not (tmp_path / "mlruns").exists()
    assert sorted(os.listdir(tmp_path)) == ["r"]
