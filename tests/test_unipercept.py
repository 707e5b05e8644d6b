"""UniPercept (issue 18) without its environment: config checks, loud failures, ensemble opt-in, serve options.

The expert itself needs transformers 4.49 (its own environment); those tests are in test_unipercept_env.py and
test_unipercept_serve.py.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from rewards.expert_env import MARKER, ExpertEnvError, check_python, lock_digest, read_lock


def test_config_validation_names_the_field():
    from rewards.unipercept import UniPerceptConfig

    UniPerceptConfig().validate()
    UniPerceptConfig(dimensions=["iqa"], weights={"iqa": 2.0}).validate()
    bad = [({"dimensions": ["iaa", "nope"]}, "dimensions"), ({"dimensions": []}, "dimensions"),
           ({"weights": {"iaa": 1.0, "ista": 1.0}, "dimensions": ["iaa"]}, "ista"),
           ({"weights": {"iaa": -1.0}}, "weights.iaa"), ({"weights": {"iaa": 0.0, "iqa": 0.0, "ista": 0.0}}, "weights"),
           ({"scale": 0.0}, "scale")]
    for fields, word in bad:
        with pytest.raises(ValueError, match=word):
            UniPerceptConfig(**fields).validate()


def test_building_it_in_the_project_interpreter_fails_loudly():
    import transformers

    from rewards.registry import build_expert

    if transformers.__version__ == "4.49.0":
        pytest.skip("this interpreter is the UniPercept environment")
    with pytest.raises(RuntimeError, match=r"unipercept: needs transformers==4\.49\.0.*build_reward_env unipercept"):
        build_expert("unipercept", "tiny")


def test_real_preset_needs_a_local_checkpoint(tmp_path):
    from rewards.unipercept import _check_checkpoint

    with pytest.raises(FileNotFoundError, match="unipercept: config field 'model_path'.*missing.*config.json"):
        _check_checkpoint(str(tmp_path))


def test_lock_is_exact_and_pins_transformers_4_49():
    pins = read_lock("unipercept")
    assert pins["transformers"] == "4.49.0" and pins["peft"] == "0.17.1" and pins["unipercept-reward"] == "1.0.3"
    assert pins["tokenizers"].startswith("0.21.") and int(pins["huggingface-hub"].split(".")[0]) < 1
    assert "torch" not in pins and "torchvision" not in pins      # never a second torch
    with pytest.raises(ValueError, match="unknown expert environment 'nope'"):
        read_lock("nope")


def test_missing_or_broken_interpreter_is_reported_with_the_fix(tmp_path):
    with pytest.raises(ExpertEnvError, match=r"serve\.unipercept\.python = .* does not exist.*build_reward_env "
                                             r"unipercept.*every node"):
        check_python(tmp_path / "none" / "bin" / "python", "unipercept")
    script = tmp_path / "bin" / "python"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho 'ImportError: libfoo.so missing' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(ExpertEnvError, match="is broken .*libfoo.*--force"):
        check_python(script, "unipercept")


def test_an_overlay_without_its_packages_is_broken(tmp_path):
    """A venv of this Python that reaches Ray but lacks the pinned packages (as after a failed install)."""
    import sysconfig

    root = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "_p.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    (root / MARKER).write_text(json.dumps({"env": "unipercept", "lock_sha256": lock_digest("unipercept")}))
    with pytest.raises(ExpertEnvError, match=r"is broken: .*transformers 5\.\S+ \(lock 4\.49\.0\)"):
        check_python(root / "bin" / "python", "unipercept")
    (root / MARKER).write_text(json.dumps({"env": "unipercept", "lock_sha256": "old"}))
    with pytest.raises(ExpertEnvError, match="transformers"):   # packages first, then the lock digest
        check_python(root / "bin" / "python", "unipercept")


def test_serve_config_runtime_env_and_defaults():
    from configs.loader import ConfigError, from_dict
    from configs.serve import UNIPERCEPT_PYTHON, ExpertServeConfig, ServeConfig

    cfg = ServeConfig()
    for c in (cfg, ServeConfig.tiny(), from_dict(ServeConfig, {"unipercept": {"num_gpus": 0.5}})):
        assert c.unipercept.interpreter("unipercept") == UNIPERCEPT_PYTHON and c.tier.interpreter("tier") == ""
    assert "unipercept" not in cfg.enabled and cfg.tier.actor_runtime_env("tier") is None
    assert cfg.unipercept.expert_config("unipercept").device == "cuda"   # num_gpus 0.25 by default
    plain = ExpertServeConfig(runtime_env={"env_vars": {"A": "1"}})
    assert plain.actor_runtime_env("der") == {"env_vars": {"A": "1"}}
    with pytest.raises(ExpertEnvError, match="does not exist"):
        ExpertServeConfig(python="/nonexistent/python").actor_runtime_env("der")
    with pytest.raises(ConfigError, match="runtime_env.pip conflicts with python"):
        from_dict(ServeConfig, {"unipercept": {"python": "/opt/env/bin/python", "runtime_env": {"pip": ["x"]}}})
    with pytest.raises(ConfigError, match="py_executable"):
        from_dict(ServeConfig, {"der": {"runtime_env": {"py_executable": "/usr/bin/python3"}}})
    ok = from_dict(ServeConfig, {"enabled": ["tier", "unipercept"], "unipercept": {"runtime_env": {
        "pip": {"packages": ["transformers==4.49.0"], "pip_install_options": ["--no-deps"]}}}})
    assert ok.unipercept.interpreter("unipercept") == ""    # auto: Ray's pip environment picks the interpreter
    assert ok.unipercept.actor_runtime_env("unipercept")["pip"]["packages"] == ["transformers==4.49.0"]


def test_paper_weights_unchanged_and_perceptual_term_is_opt_in():
    from rewards.config import EnsembleConfig
    from rewards.ensemble import PERCEPTUAL_WEIGHT, RewardEnsemble, with_perceptual

    paper = EnsembleConfig()
    assert "unipercept" not in paper.experts
    weights = with_perceptual()
    for cat, ws in paper.weights.items():
        assert {k: v for k, v in weights[cat].items() if k != "unipercept"} == ws
        assert weights[cat]["unipercept"] == PERCEPTUAL_WEIGHT
    only_humans = with_perceptual(weight={"human": 0.2})
    assert only_humans["human"]["unipercept"] == 0.2 and only_humans["animal"]["unipercept"] == 0.0
    ens = RewardEnsemble(EnsembleConfig(weights=weights))
    per = {"tier": np.array([0.5, 0.5], np.float32), "ber": np.array([0.4, 0.4], np.float32),
           "der": np.array([0.6, 0.6], np.float32), "unipercept": np.array([0.2, 0.9], np.float32)}
    res = ens.combine(per, ["animal", "animal"])
    base = 0.4 * 0.5 + 0.3 * 0.4 + 0.3 * 0.6
    np.testing.assert_allclose(res.total, [base + 0.1 * 0.2, base + 0.1 * 0.9], rtol=1e-6)


def test_dsog_accepts_unipercept_and_eval_has_perceptual_columns():
    from configs.schema import load_config
    from rl.eval import metrics as M
    from rl.eval.perceptual import build_perceptual_scorer, perceptual_metrics

    cfg = load_config("tiny_cpu", ["serve.enabled=[tier,ber,der,fer,unipercept]", "dsog.scorer=unipercept"])
    assert cfg.dsog.scorer == "unipercept"
    assert [k for k, _ in M.METRICS if k in ("iaa", "iqa", "ista")] == ["iaa", "iqa", "ista"]
    assert build_perceptual_scorer(load_config("tiny_cpu")) is None            # not enabled: no columns computed
    assert perceptual_metrics(None, np.zeros((2, 8, 8, 3), np.uint8), [{}, {}]) == {
        "iaa": None, "iqa": None, "ista": None}
    bad = dataclasses.replace(cfg.serve.unipercept, python="/nonexistent/python")
    cfg.serve.unipercept = bad
    with pytest.raises(ExpertEnvError, match="does not exist"):
        build_perceptual_scorer(cfg)
