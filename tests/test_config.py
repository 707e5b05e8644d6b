"""Config files, field docstrings, the generated reference, and config errors that name the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.cluster.placement import plan_layout, roles_from_config
from configs.loader import ConfigError, field_docs, walk_dataclasses
from configs.schema import TrainConfig, load_config
from launch.config_docs import config_markdown, config_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny_cpu", "h100x8", "h100x8_colocated"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.run.steps > 0 and cfg.serve.enabled


@pytest.mark.parametrize("name", ["h100x8", "h100x8_colocated"])
def test_cluster_configs_hold_table_4_real_weights_and_fit_8_gpus(name):
    cfg = load_config(name)
    assert (cfg.rollout.group_size, cfg.learner.lr, cfg.objective.kl_beta) == (9, 1e-6, 0.01)
    assert (cfg.sampler.guidance_scale, cfg.sampler.timesteps, cfg.run.prompts_per_step, cfg.run.steps) == \
        (5.0, 50, 1, 100)
    assert (cfg.learner.zero_stage, cfg.learner.dtype, cfg.model.dtype) == (2, "bfloat16", "bfloat16")
    m = cfg.model
    assert m.preset == "real" and not m.random_init and m.concept_checkpoint_epoch is not None
    for path in (m.showo_path, m.tokenizer_path, m.magvit_path, m.concept_checkpoint_dir, cfg.run.output_root,
                 cfg.data.root):
        assert path and Path(path).is_absolute(), path   # D15: runs and weights live at absolute paths
    experts = {e: cfg.serve.expert(e).expert_config(e) for e in cfg.serve.enabled}
    assert experts["der"].model_path.startswith("/") and experts["ber"].model_path.startswith("/")
    assert experts["fer"].weights_path.startswith("/") and experts["tier"].model_path.startswith("/")
    assert all(not getattr(c, "random_init") and c.device == "cuda" for c in experts.values())
    assert cfg.serve.expert("clip").expert_config("clip").pretrained.startswith("/")
    reward_gpus = sum(cfg.serve.expert(e).num_gpus for e in ("tier", "ber", "der", "fer", "clip"))
    assert all(0 < cfg.serve.expert(e).num_gpus <= 0.25 for e in cfg.serve.enabled) and reward_gpus <= 1.0
    plan = plan_layout(roles_from_config(cfg), cfg.placement)
    assert plan.totals()["GPU"] + 1 <= 8   # learner + rollout GPUs, plus one GPU shared by the experts
    if name == "h100x8":
        assert cfg.placement.layout == "split" and cfg.sync.backend == "nccl"
        assert (cfg.learner.num_ranks, cfg.rollout.num_workers) == (4, 3)
    else:
        assert cfg.placement.layout == "colocated" and cfg.sync.backend == "gloo"
        assert len(plan.bundles["colocated"]) == cfg.learner.num_ranks


def test_every_config_field_has_a_docstring():
    missing = [f"{key} ({cls.__module__}.{cls.__name__})" for key, cls, f in walk_dataclasses(TrainConfig)
               if not field_docs(cls).get(f.name, "").strip()]
    assert not missing, missing


def test_config_reference_lists_every_key():
    rows = {key for key, *_ in config_rows()}
    text = config_markdown()
    for key, cls, f in walk_dataclasses(TrainConfig):
        for expert in ("tier", "ber", "der", "fer", "clip", "unipercept"):
            key = key.replace(f"serve.{expert}.", "serve.<expert>.").replace(f"serve.{expert}", "serve.<expert>")
        assert key in rows and f"`{key}`" in text, key
    assert "| `learner.lr` | `float` | `1e-06` |" in text and "### `serve`" in text
    out = subprocess.run([sys.executable, "-m", "launch.config_docs", "--metrics"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "`run.steps`" in out.stdout and "ray_grpo_reward_total" in out.stdout


@pytest.mark.parametrize("overrides, key", [
    (["learner.lrr=1e-4"], "learner.lrr"),                   # unknown key (with a suggestion)
    (["serve.tier.num_gpu=0.2"], "serve.tier.num_gpu"),      # unknown nested key
    (["learner.lr=fast"], "learner.lr"),                     # wrong type
    (["run.steps=2.5"], "run.steps"),                        # float for an int
    (["serve.ber.overrides=[1]"], "serve.ber.overrides"),    # list for a mapping
    (["run.steps"], "run.steps"),                            # override without '='
    (["run..steps=1"], "run..steps"),                        # empty key part
    (["run.steps.x=1"], "steps"),                            # descending into a value
    (["rollout.group_size=1"], "rollout.group_size"),        # validate()
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", overrides)
    assert key in str(err.value)


def test_yaml_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  num_rankz: 2\n")
    with pytest.raises(ConfigError, match=r"learner\.num_rankz"):
        load_config(bad)
    bad.write_text("run: [1, 2]\n")
    with pytest.raises(ConfigError, match="run"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
