"""Every job's `python -m launch.X --help`: its own usage line, examples, and no heavy import before parsing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = ["train", "inject", "scale", "evaluate", "generate", "export", "make_sample_data", "config_docs", "new_concept"]
HEAVY = ("torch", "ray", "transformers", "deepspeed", "numpy")

PROBE = """
import runpy, sys
sys.argv = ["x", "--help"]
try:
    runpy.run_module("launch.{job}", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("HEAVY:", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("job", JOBS)
def test_help_shows_the_module_usage_and_examples_without_heavy_imports(job):
    out = subprocess.run([sys.executable, "-c", PROBE.format(job=job, heavy=HEAVY)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.startswith(f"usage: python -m launch.{job} "), text[:200]
    assert "examples:" in text and f"python -m launch.{job}" in text.split("examples:", 1)[1]
    heavy = text.rsplit("HEAVY:", 1)[1].strip()
    allowed = "['numpy']" if job == "generate" else "[]"   # generate's module needs numpy at import (cheap)
    assert heavy == allowed, f"launch.{job} --help imported {heavy}"


def test_scale_lists_every_reward_expert():
    from configs.serve import ALL_EXPERTS
    from launch.scale import EXPERTS

    assert tuple(EXPERTS) == tuple(ALL_EXPERTS)


def test_make_sample_data_example_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.make_sample_data", str(tmp_path / "s"), "--image-size", "64"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and (tmp_path / "s" / "concepts_list.json").is_file(), out.stderr[-2000:]
