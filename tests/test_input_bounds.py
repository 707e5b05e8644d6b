"""Bounds on what the service reads (issue 25): ``data.reader`` limits on JSON file sizes (checked before the file is
read) and on the values one file holds, and YAML syntax errors as one line with file:line:column; ``launch.train``
prints either as one line and exits 2 before Ray starts, and nothing on disk changes."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from configs.loader import ConfigError
from configs.schema import load_config
from rl.data.files import DataConfig, DatasetError, read_json
from rl.data.reader import load_concept_dataset


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def data(sample_root, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(sample_root, dst)
    return dst


def test_an_oversized_json_file_is_refused_before_it_is_parsed(data, monkeypatch):
    conv = data / "concept" / "train" / "chelsea" / "conversations.json"
    conv.write_text("[" * 3000 + "not json at all " * 4000)            # 67 KB of garbage
    real = json.loads

    def loads(text, *a, **k):
        assert "not json at all" not in text, "parsed a file above the limit"
        return real(text, *a, **k)
    monkeypatch.setattr(json, "loads", loads)
    with pytest.raises(DatasetError) as info:
        load_concept_dataset(data, config=DataConfig(max_json_bytes=64 * 1024))
    msg = str(info.value)
    assert msg.startswith(f"{conv}: ") and "data.reader.max_json_bytes=65536" in msg and "\n" not in msg


def test_a_json_file_with_too_many_values_is_refused(data):
    t2i = data / "concept" / "test" / "cuppa" / "t2i_conditions.json"
    raw = json.loads(t2i.read_text())
    raw["extra_prompts"] = [f"A photo of <cuppa> number {i}." for i in range(500)]
    t2i.write_text(json.dumps(raw))
    before = _digest(data)
    with pytest.raises(DatasetError, match=rf"^{t2i}: 50[0-9] values .*data\.reader\.max_json_items=400$"):
        load_concept_dataset(data, config=DataConfig(max_json_items=400))
    assert _digest(data) == before
    load_concept_dataset(data)                                          # the defaults are far above


def test_defaults_are_far_above_the_sample_files_and_configurable(sample_root):
    d = DataConfig()
    biggest = max(p.stat().st_size for p in sample_root.rglob("*.json"))
    assert d.max_json_bytes >= 1000 * biggest
    cfg = load_config("tiny_cpu", ["data.reader.max_json_bytes=1000", "data.reader.max_json_items=50"])
    assert (cfg.data.reader.max_json_bytes, cfg.data.reader.max_json_items) == (1000, 50)
    with pytest.raises(ConfigError, match="max_json_bytes"):
        load_config("tiny_cpu", ["data.reader.max_json_bytes=0"])
    with pytest.raises(DatasetError, match="max_json_bytes=10 "):
        read_json(sample_root / "concepts_list.json", cfg=DataConfig(max_json_bytes=10))


@pytest.mark.parametrize("text,where", [
    ("run:\n  steps: 3\n  name: [a, b\nlearner:\n  lr: 1\n", ":4:8: invalid YAML: expected ',' or ']'"),
    ("run:\n  steps: 3\n   name: x\n", ":3:8: invalid YAML: mapping values are not allowed here"),
    ("run:\n\tsteps: 3\n", ":2:1: invalid YAML: found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_errors_are_one_line_with_file_line_column(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}{where}") and "\n" not in msg


def test_launch_train_prints_one_line_and_exits_2(tmp_path, data, capsys):
    from launch.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  name: [a, b\n")
    out = tmp_path / "runs"
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:4:1: invalid YAML") and "\n" not in err
    before = _digest(data)
    assert main(["--config", "tiny_cpu", f"data.root={data}", f"run.output_root={out}",
                 "data.reader.max_json_bytes=200"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.reader.max_json_bytes=200" in err and err.startswith(f"error: {data}")
    assert _digest(data) == before and not out.exists()
