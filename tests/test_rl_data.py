"""Dataset reader + sample data, seeds (D7) and the RolloutSample contract."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rl.data.reader import DataConfig, DatasetError, load_concept_dataset
from rl.data.sample import MARKER, SAMPLE_CONCEPTS, write_sample_dataset
from rl.grpo.batch import RolloutSample, sort_samples, validate_batch
from rl.grpo.seeding import make_generator, make_numpy_generator, sample_seed


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("data") / "ds", image_size=64, log=lambda s: None)


@pytest.fixture
def copy(sample_root, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(sample_root, dst)
    return dst


# ------------------------------------------------------------------------------------------ sample data
def test_sample_dataset_loads_train_only(sample_root):
    ds = load_concept_dataset(sample_root)
    assert list(ds.concepts) == list(SAMPLE_CONCEPTS)
    cats = {c.info.category for c in ds.concepts.values()}
    assert cats == {"human", "animal", "object"}
    for c in ds.concepts.values():
        assert c.test is None  # D14: training never reads test/
        assert len(c.train.images) == 5 and len(c.train.cropped) == 5 and c.train.negative_examples
        assert len(set(c.info.extra_info)) >= 4 and c.info.class_word
        assert c.train.reasoning and all(c.info.token in r.prompt for r in c.train.reasoning)
        assert set(c.train.conversations) <= {r.name for r in c.train.images}
        img = c.train.images[0].load()
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert ds.black().shape == (512, 512, 3) and ds.black().max() == 0
    assert len(ds.random_images) == 4


def test_sample_dataset_test_split_both_t2i_forms(sample_root):
    raw = [json.loads((sample_root / "concept/test" / c / "t2i_conditions.json").read_text())
           for c in SAMPLE_CONCEPTS]
    assert isinstance(raw[0], list) and all(isinstance(r, dict) for r in raw[1:])
    ds = load_concept_dataset(sample_root, ["astro", "cuppa"], include_test=True)
    for c in ds.concepts.values():
        prompts = c.test.t2i_conditions["personalized_driven_generation"]
        assert prompts and all(c.info.token in p for p in prompts)
        assert c.test.vqa and c.test.text_only and len(c.test.images) == 2
    from rl.eval.items import read_prompts_to_eval

    assert set(read_prompts_to_eval(sample_root / "prompts_to_eval.json")) == {"object", "live_subject"}
    assert [it.type for it in ds.concept("astro").test.items][:2] == ["rec", "rec"]
    assert ds.concept("cuppa").test.items is None   # no test_data/cuppa.json: vqa.json / text_only.json are used


def test_sample_data_deterministic_and_force(tmp_path, sample_root):
    out = write_sample_dataset(tmp_path / "a", image_size=64, log=lambda s: None)
    for f in ("concept/train/chelsea/2.png", "concept/train/astro/info.json", "random_images/1.png"):
        assert (out / f).read_bytes() == (sample_root / f).read_bytes()
    with pytest.raises(ValueError, match="not empty"):
        write_sample_dataset(out, image_size=64, log=lambda s: None)
    write_sample_dataset(out, force=True, image_size=64, log=lambda s: None)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=MARKER):
        write_sample_dataset(other, force=True, log=lambda s: None)
    assert (other / "keep.txt").exists()


def test_cli(tmp_path, capsys):
    from launch.make_sample_data import main

    assert main([str(tmp_path / "cli"), "--image-size", "32"]) == 0
    assert "astro" in capsys.readouterr().out
    assert main([str(tmp_path / "cli"), "--image-size", "32"]) == 2
    load_concept_dataset(tmp_path / "cli")


# ------------------------------------------------------------------------------------------ broken data
def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def test_missing_info_json(copy):
    (copy / "concept/train/chelsea/info.json").unlink()
    with pytest.raises(DatasetError, match=r"chelsea/info\.json: required file is missing"):
        load_concept_dataset(copy)


def test_bad_json(copy):
    (copy / "concept/train/astro/conversations.json").write_text('{"0.png": [')
    with pytest.raises(DatasetError, match=r"astro/conversations\.json: invalid JSON"):
        load_concept_dataset(copy)


def test_broken_and_empty_image(copy):
    (copy / "concept/train/cuppa/2.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"cuppa/2\.png: cannot decode image"):
        load_concept_dataset(copy)
    (copy / "concept/train/cuppa/2.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cuppa/2\.png: empty image file"):
        load_concept_dataset(copy)


def test_huge_image_rejected(copy):
    with pytest.raises(DatasetError, match="max_image_pixels"):
        load_concept_dataset(copy, config=DataConfig(max_image_pixels=1000))


def test_unknown_concept(copy):
    with pytest.raises(DatasetError, match=r"unknown concept 'bo'.*concepts_list\.json"):
        load_concept_dataset(copy, ["bo"])
    ds = load_concept_dataset(copy, ["astro"])
    with pytest.raises(DatasetError, match="unknown concept 'chelsea'"):
        ds.concept("chelsea")


def test_missing_answer_item(copy):
    p = copy / "concept/train/astro/reasoning.json"   # the optional override of the t2i_conditions pairing
    p.write_text(json.dumps([{"prompt": f"A photo of <astro> {k}.", "answer_index": k} for k in range(4)]))
    _edit_json(p, lambda d: d + [{"prompt": "A photo of <astro> swimming.", "answer_index": 9}])
    with pytest.raises(DatasetError, match=r"reasoning\.json: field \[4\]\.'answer_index'=9"):
        load_concept_dataset(copy)
    _edit_json(p, lambda d: d[:4] + [{"prompt": "A photo of <astro> swimming.", "answer": "<astro> swims."}])
    with pytest.raises(DatasetError, match=r"'answer' is not an item of info\.json extra_info"):
        load_concept_dataset(copy)
    _edit_json(p, lambda d: d[:4] + [{"prompt": "A photo of someone.", "answer_index": 0}])
    with pytest.raises(DatasetError, match="must mention <astro>"):
        load_concept_dataset(copy)


def test_answer_text_form_accepted(copy):
    p = copy / "concept/train/chelsea/reasoning.json"
    info = json.loads((copy / "concept/train/chelsea/info.json").read_text())
    p.write_text(json.dumps([{"prompt": "A photo of <chelsea> outdoors.", "answer": info["extra_info"][1]}]))
    ds = load_concept_dataset(copy, ["chelsea"])
    assert ds.concept("chelsea").train.reasoning[0].answer_index == 1
    assert ds.concept("chelsea").train.reasoning_source == "reasoning.json"


def test_bad_info_fields(copy):
    p = copy / "concept/train/astro/info.json"
    _edit_json(p, lambda d: {**d, "category": "robot"})
    with pytest.raises(DatasetError, match=r"info\.json: field 'category' must be one of"):
        load_concept_dataset(copy)
    _edit_json(p, lambda d: {k: v for k, v in d.items() if k not in ("category", "class")} | {"category": "human"})
    with pytest.raises(DatasetError, match=r"info\.json: missing field 'class'"):
        load_concept_dataset(copy)
    _edit_json(p, lambda d: {**d, "class": "woman", "extra_info": ["a", "a"]})
    with pytest.raises(DatasetError, match=r"'extra_info'\[1\] duplicates"):
        load_concept_dataset(copy)


def test_conversation_key_matching_as_released(copy, caplog):
    """grpo.py gives an image the first key that is a substring of its path; keys matching nothing are unused."""
    _edit_json(copy / "concept/train/astro/conversations.json", lambda d: {**d, "17.png": d["0.png"]})
    with caplog.at_level("WARNING"):
        ds = load_concept_dataset(copy, ["astro"])
    assert "'17.png'" in caplog.text and "unused" in caplog.text
    assert sorted(ds.concept("astro").train.conversations) == ["0.png", "1.png", "2.png", "3.png", "4.png"]


def test_test_split_only_read_when_asked(copy):
    shutil.rmtree(copy / "concept/test/cuppa")   # cuppa has no test_data/cuppa.json either
    load_concept_dataset(copy)
    with pytest.raises(DatasetError, match="test folder of concept 'cuppa' is missing"):
        load_concept_dataset(copy, include_test=True)


def test_missing_black_and_training_images(copy):
    for f in (copy / "concept/train/cuppa").glob("*.png"):
        f.unlink()
    with pytest.raises(DatasetError, match="no training images"):
        load_concept_dataset(copy)
    (copy / "black_512x512.png").unlink()
    with pytest.raises(DatasetError, match="black_512x512.png: image file not found"):
        load_concept_dataset(copy)


# ------------------------------------------------------------------------------------------ seeds
def test_sample_seed_stable_and_distinct():
    s = sample_seed(1, 2, 3, 4, 0, "image")
    assert s == sample_seed(1, 2, 3, 4, 0, "image")
    assert 0 <= s < 2**63
    others = {sample_seed(1, 2, 3, 4, 1, "image"), sample_seed(1, 2, 3, 5, 0, "image"),
              sample_seed(1, 2, 4, 4, 0, "image"), sample_seed(1, 3, 3, 4, 0, "image"),
              sample_seed(2, 2, 3, 4, 0, "image"), sample_seed(1, 2, 3, 4, 0, "answer")}
    assert s not in others and len(others) == 6
    # pinned value: must never change across processes / Python versions (resume exactness)
    assert sample_seed(0, 0, 0, 0, 0, "image") == 778554791098124995
    with pytest.raises(ValueError, match="stream"):
        sample_seed(0, 0, 0, 0, 0, "")
    with pytest.raises(ValueError, match="step"):
        sample_seed(0, 1.5, 0, 0, 0, "x")


def test_generators_reproducible():
    a = torch.rand(3, generator=make_generator(123))
    b = torch.rand(3, generator=make_generator(123))
    assert torch.equal(a, b)
    assert make_numpy_generator(5).integers(0, 1000) == make_numpy_generator(5).integers(0, 1000)


# ------------------------------------------------------------------------------------------ RolloutSample
def _sample(step=0, p=0, i=0, T=3, N=4) -> RolloutSample:
    return RolloutSample(
        step=step, prompt_index=p, sample_index=i, concept="astro", category="human", task_kind="text",
        mmu_input_ids=np.arange(7, dtype=np.int64), answer_ids=np.arange(3, dtype=np.int64),
        answer_logps=np.zeros(3, np.float32), answer_text="a", prompt_text="cp", prompt_cut=False,
        t2i_input_ids=np.zeros(9, np.int64), uncond_input_ids=np.zeros(9, np.int64),
        states=np.zeros((T, N), np.int64), chosen=np.zeros((T, N), np.int64),
        image_logps=np.zeros((T, N), np.float32), final_ids=np.zeros(N, np.int64),
        image=np.zeros((8, 8, 3), np.uint8), screen_score=0.4, attempts=1)


def test_rollout_sample_validation_names_field():
    _sample().validate()
    s = _sample()
    s.image_logps = s.image_logps.astype(np.float64)
    with pytest.raises(ValueError, match=r"RolloutSample\.image_logps: expected dtype float32"):
        s.validate()
    s = _sample()
    s.chosen = np.zeros((3, 5), np.int64)
    with pytest.raises(ValueError, match=r"\.chosen: shape"):
        s.validate()
    s = _sample()
    s.task_kind = "audio"
    with pytest.raises(ValueError, match="task_kind"):
        s.validate()
    s = _sample()
    s.answer_logps = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="answer_logps"):
        s.validate()


def test_validate_batch_and_order():
    batch = [_sample(0, 1, 0), _sample(0, 0, 1), _sample(0, 0, 0)]
    assert [s.key for s in sort_samples(validate_batch(batch))] == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    with pytest.raises(ValueError, match="duplicate id"):
        validate_batch([_sample(), _sample()])
    with pytest.raises(ValueError, match=r"RolloutSample\[1\]\.states"):
        validate_batch([_sample(), _sample(i=1, T=2)])
