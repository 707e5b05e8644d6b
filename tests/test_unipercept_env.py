"""UniPercept in its own environment (issue 18): the overlay is built from the registry once (skipped when up to
date), the expert agrees with the package's own ``reward()`` and runs from the project interpreter over a pipe."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rewards.base import ScoreBatch

pytestmark = pytest.mark.slow

README_MAX_ABS_DIFF = 2.3e-5
"""The largest expert-vs-package score difference the README states (0-100 scale, fp32)."""


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)[:48] for i in range(n)])


def test_overlay_shadows_transformers_and_shares_torch(unipercept_python):
    code = ("import transformers, torch, unipercept_reward, peft, rewards, sys; print(transformers.__version__, "
            "transformers.__file__, torch.__file__, peft.__version__)")
    out = subprocess.run([str(unipercept_python), "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    version, tf_file, torch_file, peft_version = out.stdout.strip().splitlines()[-1].split()
    import torch

    assert version == "4.49.0" and peft_version == "0.17.1"
    assert tf_file.startswith(str(unipercept_python.parent.parent))      # its own transformers ...
    assert torch_file == torch.__file__                                   # ... and the project's torch


def test_expert_matches_the_package_reward_in_fp32(unipercept_python):
    """Same tiny checkpoint, fp32: the batched expert vs the package's per-image reward() (also the benchmark)."""
    from rewards.expert_env import PROJECT_ROOT

    out = subprocess.run([str(unipercept_python), "-m", "launch.bench.unipercept", "--images", "4", "--size", "96",
                          "--batch-sizes", "1,3", "--rounds", "1"], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    values = dict(re.findall(r"^(UNIPERCEPT_\w+): (\S+)$", out.stdout, re.M))
    # README ("Reward experts"): the expert equals the package's reward() to <= 2.3e-5 on the 0-100 scale in fp32;
    # measured here 1.1e-5 (4 images x 3 dimensions, tiny random-init checkpoint, CPU)
    assert float(values["UNIPERCEPT_MAX_ABS_DIFF"]) <= README_MAX_ABS_DIFF, values["UNIPERCEPT_MAX_ABS_DIFF"]
    assert float(values["UNIPERCEPT_BATCH3_SAMPLES_PER_S"]) > 0 and "| package `reward()`" in out.stdout


def test_the_asserted_bound_is_the_readme_claim():
    """The parity test above asserts the bound the README states (no looser tolerance can slip back in)."""
    from rewards.expert_env import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    claimed = re.findall(r"equal the package's to \*\*≤ ([0-9.]+e-[0-9]+)\*\*", readme)
    assert claimed and float(claimed[0]) == README_MAX_ABS_DIFF, claimed


def test_scores_ranges_weights_and_batch_invariance(unipercept_tiny):
    images = _images(5)
    dims = unipercept_tiny.dimension_scores(images)
    assert sorted(dims) == ["iaa", "iqa", "ista"]
    for v in dims.values():
        assert v.dtype == np.float32 and v.shape == (5,) and np.all((v >= 0) & (v <= 100))
    scores = unipercept_tiny.score(ScoreBatch(images=images))
    mean = (dims["iaa"] + dims["iqa"] + dims["ista"]) / 3 * 0.01
    np.testing.assert_allclose(scores, mean, rtol=1e-5)
    assert np.all((scores >= 0) & (scores <= 1))
    one_by_one = np.concatenate([unipercept_tiny.score(ScoreBatch(images=images[i:i + 1])) for i in range(5)])
    np.testing.assert_allclose(one_by_one, scores, atol=1e-5)   # a sample's score never depends on its batch-mates
    assert len(set(np.round(dims["iaa"], 4))) > 1               # different images, different scores


def test_configured_dimensions_and_loud_failures(unipercept_python):
    from rewards.registry import build_expert
    from rewards.unipercept import UniPerceptConfig

    cfg = UniPerceptConfig.tiny()
    cfg.dimensions, cfg.weights, cfg.scale = ["iqa"], {"iqa": 1.0}, 1.0
    e = build_expert("unipercept", cfg, python=str(unipercept_python))
    try:
        images = _images(2, seed=3)
        dims = e.dimension_scores(images)
        assert list(dims) == ["iqa"]
        np.testing.assert_allclose(e.score(ScoreBatch(images=images)), dims["iqa"], rtol=1e-6)
        with pytest.raises(ValueError, match="unipercept: ScoreBatch field 'images' is required"):
            e.score(ScoreBatch(texts=["a cat"]))
        with pytest.raises(ValueError, match=r"unipercept: images\[0\]: expected a uint8"):
            e.dimension_scores([np.zeros((8, 8, 3), np.float32)])
    finally:
        e.close()
    cfg = UniPerceptConfig(model_path="/nonexistent/UniPercept")
    with pytest.raises(FileNotFoundError, match="unipercept: config field 'model_path' = '/nonexistent/UniPercept' "
                                                "does not exist"):
        build_expert("unipercept", cfg, python=str(unipercept_python))


def test_build_command_checks_and_reports(unipercept_python, tmp_path):
    from rewards.expert_env import PROJECT_ROOT

    run = lambda *a: subprocess.run([sys.executable, "-m", "launch.build_reward_env", *a], capture_output=True,
                                    text=True, timeout=600, cwd=PROJECT_ROOT)
    ok = run("unipercept", "--check")
    assert ok.returncode == 0 and "OK" in ok.stdout and '"transformers": "4.49.0"' in ok.stdout
    again = run("unipercept")
    assert again.returncode == 0 and "up to date" in again.stdout and re.search(r"ENV_SIZE_MB: [\d.]+", again.stdout)
    missing = run("unipercept", "--check", "--dest", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "build_reward_env" in missing.stderr
    unknown = run("nope")
    assert unknown.returncode == 2 and "unknown expert environment 'nope'" in unknown.stderr
