"""Reward contract: ScoreBatch validation and msgpack round trip, config docs, weight resolution, NaN errors."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import msgpack
import numpy as np
import pytest
import torch

from rewards.base import (
    ExpertConfig,
    ImageSpec,
    NonFiniteScoreError,
    RewardExpert,
    ScoreBatch,
    preprocess_images,
    resolve_weights,
)
from rewards.config import EnsembleConfig
from rewards.registry import build_expert, config_class, expert_names


def _images(b=3, h=20, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_scorebatch_roundtrip_through_msgpack():
    batch = ScoreBatch(images=_images(), texts=["a", "b", "c"], concepts=["x", "y", "x"],
                       candidates=[["p", "q"], ["r"], ["s", "t", "u"]], targets=[1, -1, np.int64(2)])
    wire = msgpack.packb(batch.to_dict())
    back = ScoreBatch.from_dict(msgpack.unpackb(wire))
    np.testing.assert_array_equal(back.images, batch.images)
    assert back.images.flags.writeable
    assert back.targets == [1, -1, 2] and back.candidates == batch.candidates and back.texts == batch.texts
    assert ScoreBatch.from_dict(ScoreBatch(texts=["only"]).to_dict()).images is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(images=_images().astype(np.float32)), "images"),
    (dict(images=_images()[..., :2]), "images"),
    (dict(images=_images()[0]), "images"),
    (dict(images=_images(), texts=["a", "b"]), "lengths differ"),
    (dict(texts=["a", 3]), "texts[1]"),
    (dict(concepts="abc"), "concepts"),
    (dict(candidates=[["a"], "b"]), "candidates[1]"),
    (dict(texts=["a"], targets=[0]), "targets"),
    (dict(candidates=[["a", "b"]], targets=[2]), "targets[0]"),
    (dict(candidates=[[]], targets=[-1]), "targets[0]"),
    (dict(candidates=[["a"]], targets=[-2]), "targets[0]"),
    (dict(candidates=[["a"]], targets=[True]), "targets[0]"),
    (dict(), "empty"),
    (dict(texts=[]), "empty"),
    (dict(images=np.zeros((0, 4, 4, 3), np.uint8)), "empty"),
])
def test_scorebatch_validate_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ScoreBatch(**kwargs).validate()


def test_from_dict_rejects_unknown_and_malformed():
    with pytest.raises(ValueError, match="unknown field"):
        ScoreBatch.from_dict({"texts": ["a"], "prompts": ["b"]})
    with pytest.raises(ValueError, match="ScoreBatch.images"):
        ScoreBatch.from_dict({"images": {"dtype": "|u1", "shape": [1, 2, 2, 3], "data": b"123"}})


def test_select_sub_batch():
    batch = ScoreBatch(images=_images(4), concepts=list("abcd"))
    sub = batch.select([3, 1])
    assert sub.concepts == ["d", "b"] and np.array_equal(sub.images, batch.images[[3, 1]])


def _field_docs(cls):
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value
    return docs


@pytest.mark.parametrize("cls", [config_class(n) for n in expert_names()] + [EnsembleConfig])
def test_every_config_field_has_a_docstring_and_tiny_differs(cls):
    docs = _field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without docstrings: {missing}"
    if cls is not EnsembleConfig:
        assert issubclass(cls, ExpertConfig) and cls.tiny() != cls()
        assert cls().random_init is False  # real weights by default


def test_weight_resolution_errors_name_field(tmp_path):
    with pytest.raises(ValueError, match="'model_path' is required"):
        resolve_weights(None, "model_path", "der", random_init=False)
    assert resolve_weights(None, "model_path", "der", random_init=True) is None
    with pytest.raises(FileNotFoundError, match="weights_path.*does not exist"):
        resolve_weights(str(tmp_path / "nope.pt"), "weights_path", "fer", random_init=False)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        resolve_weights("vggface2.pth", "weights_path", "fer", random_init=False)
    assert resolve_weights("facebook/dinov2-base", "model_path", "der", False) == "facebook/dinov2-base"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights("timesler/facenet", "weights_path", "fer", False, local_only=True)
    assert resolve_weights(str(tmp_path), "model_path", "der", False) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_pkg"):
        resolve_weights("pkg:no_such_pkg/vocab.txt", "tokenizer_path", "ber", False)


def test_missing_or_unreachable_weights_are_errors_not_random_init(tmp_path):
    with pytest.raises(ValueError, match="der: config field 'model_path' is required"):
        build_expert("der", {"model_path": None})
    with pytest.raises(FileNotFoundError, match="der: could not load config field 'model_path'"):
        build_expert("der", {"model_path": "no-such-org/no-such-dinov2"})  # hub id, offline
    with pytest.raises(FileNotFoundError, match="fer: config field 'weights_path'"):
        build_expert("fer", {"weights_path": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match="unknown config field"):
        build_expert("der", {"modle_path": "x"})
    with pytest.raises(ValueError, match="unknown reward expert"):
        build_expert("ernie")


class _Const(RewardExpert):
    name = "const"
    requires = ("texts",)

    def __init__(self, values):
        super().__init__(ExpertConfig())
        self.values = values

    def _score(self, batch):
        return np.asarray(self.values[: len(batch)], dtype=np.float64)


def test_non_finite_scores_raise_naming_the_expert():
    batch = ScoreBatch(texts=["a", "b", "c"])
    assert _Const([0.1, 0.2, 0.3]).score(batch).dtype == np.float32
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteScoreError, match=r"const: non-finite .* sample\(s\) \[1\]"):
            _Const([0.1, bad, 0.3]).score(batch)
    with pytest.raises(ValueError, match="const: ScoreBatch field 'texts' is required"):
        _Const([0.1]).score(ScoreBatch(concepts=["x"]))


def test_preprocess_is_per_image_and_normalised():
    imgs = _images(2, 30, 50)
    spec = ImageSpec(16, 20, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = preprocess_images(imgs, spec, torch.device("cpu"))
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[1:], preprocess_images(imgs[1:], spec, torch.device("cpu")))
    flat = preprocess_images([np.full((7, 9, 3), 255, np.uint8)], ImageSpec(8, None, (0, 0, 0), (1, 1, 1)),
                             torch.device("cpu"))
    torch.testing.assert_close(flat, torch.ones(1, 3, 8, 8))
