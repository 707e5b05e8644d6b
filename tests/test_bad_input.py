"""Bad input, enumerated: every case gets a clear error naming the problem, and nothing on disk is changed.

One table drives the test; each case builds its own broken input in a temporary folder and states the exception
type and a substring the message must contain (the key, file or field at fault). Each case runs its failing call
inside ``uses(paths...)``: the content hashes of every file under those paths (the data root, run folder, config or
weights file the call reads or might write; an absent path must stay absent) are taken right before the call and
compared right after it, so "nothing on disk changes" is checked on what the case actually touches.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actors.cluster.placement import PlacementError, RoleSpec, check_fits, plan_layout
from actors.driver.checkpoint import CheckpointError, resolve_resume
from backbone.build import ConceptSpec, build_policy
from backbone.checkpoint import load_showo_state_dict
from backbone.concepts import load_concept_checkpoint
from backbone.config import ModelConfig
from backbone.phi import ShowoPhi, ShowoPhiConfig
from configs.loader import ConfigError
from configs.placement import PlacementConfig
from configs.schema import load_config
from rewards.base import NonFiniteScoreError, ScoreBatch
from rewards.ensemble import RewardEnsemble
from rewards.registry import build_expert
from rl.data.reader import DatasetError, load_concept_dataset
from rl.data.sample import write_sample_dataset


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "sample"
    write_sample_dataset(root, image_size=64, log=lambda *_: None)
    return root


ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
"""The packaged config that ``load_config("tiny_cpu")`` reads."""


def _tree_digest(root: Path) -> str:
    """Content hash of a file, or of a folder's files and sub-folders (names and bytes); absent is a value too."""
    root = Path(root)
    if not root.exists():
        return "absent"
    if root.is_file():
        return "file:" + hashlib.sha256(root.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + (b"/" if p.is_dir() else b":"))
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class DiskWatch:
    """``with uses(*paths): call()`` hashes ``paths`` before the call and raises AssertionError (replacing the
    call's own error) naming every path whose content changed, appeared or vanished."""

    def __init__(self):
        self.paths: list[Path] | None = None

    @contextmanager
    def __call__(self, *paths):
        if not paths:
            raise ValueError("uses(): name the files or folders the call touches")
        self.paths = [Path(p) for p in paths]
        before = {p: _tree_digest(p) for p in self.paths}
        try:
            yield
        finally:
            changed = [str(p) for p in self.paths if _tree_digest(p) != before[p]]
            if changed:
                raise AssertionError(f"the failing call changed what it used on disk: {changed}")


def _copy(sample: Path, tmp: Path) -> Path:
    import shutil

    dst = tmp / "data"
    shutil.copytree(sample, dst)
    return dst


# -- the cases: (name, fn(sample, tmp) -> None, exception, message fragment) --------------------------------------
def cfg_unknown_key(sample, tmp, uses):
    with uses(TINY_CONFIG):
        load_config("tiny_cpu", ["run.stepz=3"])


def cfg_wrong_type(sample, tmp, uses):
    with uses(TINY_CONFIG):
        load_config("tiny_cpu", ["learner.num_ranks=two"])


def cfg_bad_yaml(sample, tmp, uses):
    path = tmp / "bad.yaml"
    path.write_text("run: [unclosed\n")
    with uses(path):
        load_config(path)


def cfg_not_a_mapping(sample, tmp, uses):
    path = tmp / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with uses(path):
        load_config(path)


def cfg_missing_file(sample, tmp, uses):
    with uses(tmp):
        load_config(tmp / "nope.yaml")


def cfg_group_size_one(sample, tmp, uses):
    with uses(TINY_CONFIG):
        load_config("tiny_cpu", ["rollout.group_size=1"])


def cfg_screen_after_end(sample, tmp, uses):
    with uses(TINY_CONFIG):
        load_config("tiny_cpu", ["dsog.screen_step=20", "sampler.timesteps=12"])


def cfg_unknown_expert(sample, tmp, uses):
    with uses(TINY_CONFIG):
        load_config("tiny_cpu", ["serve.enabled=[tier, vibes]"])


def layout_too_many_cpus(sample, tmp, uses):
    roles = [RoleSpec("learner", 4, 4.0, 0.0), RoleSpec("rollout", 3, 4.0, 0.0)]
    with uses(tmp):
        check_fits(plan_layout(roles, PlacementConfig()), roles, "split", {"CPU": 2.0})


def layout_too_many_gpus(sample, tmp, uses):
    roles = [RoleSpec("learner", 4, 1.0, 1.0), RoleSpec("rollout", 3, 1.0, 1.0)]
    with uses(tmp):
        check_fits(plan_layout(roles, PlacementConfig()), roles, "split", {"CPU": 64.0, "GPU": 4.0})


def resume_missing_checkpoint(sample, tmp, uses):
    with uses(tmp):
        resolve_resume(tmp, str(tmp / "checkpoints" / "step_000009"))


def resume_half_written_checkpoint(sample, tmp, uses):
    half = tmp / "checkpoints" / "step_000004"
    half.mkdir(parents=True)
    (half / "state.json").write_text("{}")        # no COMPLETE marker: a write that died half-way
    with uses(tmp):
        resolve_resume(tmp, str(half))


def showo_weights_missing(sample, tmp, uses):
    with uses(tmp):
        build_policy(ModelConfig(preset="tiny", tokenizer_path="builtin:tiny", showo_path=str(tmp / "none.safetensors"),
                                 magvit_path=str(tmp / "none2")), [])


def showo_weights_wrong_shape(sample, tmp, uses):
    from safetensors.torch import save_file

    model = ShowoPhi(ShowoPhiConfig.tiny())
    sd = {f"showo.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["showo.lm_head.bias"] = torch.zeros(7)
    save_file(sd, str(tmp / "model.safetensors"))
    with uses(tmp):
        load_showo_state_dict(ShowoPhi(ShowoPhiConfig.tiny()), tmp / "model.safetensors")


def concept_checkpoint_wrong_shape(sample, tmp, uses):
    policy = build_policy(ModelConfig.tiny(), [ConceptSpec("bo", "dog")])
    ct = policy.concepts["bo"]
    hidden = policy.model.config.hidden_size
    torch.save(torch.zeros(3, hidden), tmp / "epoch_5_embed.pt")
    torch.save(torch.zeros(3, hidden), tmp / "epoch_5_lm_head_weight.pt")
    torch.save(torch.zeros(3), tmp / "epoch_5_lm_head_bias.pt")
    with uses(tmp):
        load_concept_checkpoint(policy.model, ct, tmp, epoch=5)


def concept_checkpoint_missing(sample, tmp, uses):
    policy = build_policy(ModelConfig.tiny(), [ConceptSpec("bo", "dog")])
    with uses(tmp):
        load_concept_checkpoint(policy.model, policy.concepts["bo"], tmp, epoch=15)


def tokenizer_missing(sample, tmp, uses):
    with uses(tmp):
        build_policy(ModelConfig(preset="tiny", random_init=True, tokenizer_path=str(tmp / "phi-1_5")), [])


def reward_weights_missing_der(sample, tmp, uses):
    with uses(tmp):
        build_expert("der", {"model_path": str(tmp / "dinov2-base")})


def reward_weights_missing_fer(sample, tmp, uses):
    with uses(tmp):
        build_expert("fer", {"weights_path": str(tmp / "vggface2.pt")})


def data_missing_info(sample, tmp, uses):
    root = _copy(sample, tmp)
    (root / "concept" / "train" / "chelsea" / "info.json").unlink()
    with uses(root):
        load_concept_dataset(root)


def data_bad_json(sample, tmp, uses):
    root = _copy(sample, tmp)
    (root / "concept" / "train" / "cuppa" / "info.json").write_text("{not json")
    with uses(root):
        load_concept_dataset(root)


def data_broken_image(sample, tmp, uses):
    root = _copy(sample, tmp)
    img = next((root / "concept" / "train" / "astro").glob("*.png"))
    img.write_bytes(img.read_bytes()[:100])
    with uses(root):
        load_concept_dataset(root)


def data_empty_image(sample, tmp, uses):
    root = _copy(sample, tmp)
    img = next((root / "concept" / "train" / "astro").glob("*.png"))
    img.write_bytes(b"")
    with uses(root):
        load_concept_dataset(root)


def data_huge_image(sample, tmp, uses):
    from rl.data.reader import DataConfig

    root = _copy(sample, tmp)
    img = next((root / "concept" / "train" / "chelsea").glob("*.png"))
    Image.new("RGB", (300, 300)).save(img)
    with uses(root):
        load_concept_dataset(root, config=DataConfig(max_image_pixels=200 * 200))


def data_unknown_concept(sample, tmp, uses):
    with uses(sample):
        load_concept_dataset(sample, concepts=["nobody"])


def data_missing_answer_item(sample, tmp, uses):
    root = _copy(sample, tmp)
    path = root / "concept" / "train" / "cuppa" / "reasoning.json"   # the optional override
    path.write_text(json.dumps([{"prompt": "A photo of <cuppa> on a table.", "answer_index": 99}]))
    with uses(root):
        load_concept_dataset(root)


def _edit(path, fn):
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def data_info_wrong_type(sample, tmp, uses):
    root = _copy(sample, tmp)
    (root / "concept" / "train" / "chelsea" / "info.json").write_text('["not", "an", "object"]')
    with uses(root):
        load_concept_dataset(root)


def data_extra_info_wrong_type(sample, tmp, uses):
    root = _copy(sample, tmp)
    _edit(root / "concept" / "train" / "chelsea" / "info.json", lambda d: {**d, "extra_info": "one fact"})
    with uses(root):
        load_concept_dataset(root)


def data_empty_extra_info_with_text_tasks(sample, tmp, uses):
    from rl.data.reader import check_training_use

    root = _copy(sample, tmp)
    _edit(root / "concept" / "train" / "cuppa" / "info.json", lambda d: {**d, "extra_info": []})
    with uses(root):
        check_training_use(load_concept_dataset(root), text_task_ratio=0.5)


def data_no_usable_reference(sample, tmp, uses):
    root = _copy(sample, tmp)
    _edit(root / "concept" / "train" / "train_images.json", lambda d: {**d, "astro": ["gone.png"]})
    with uses(root):
        load_concept_dataset(root)


def data_truncated_image(sample, tmp, uses):
    root = _copy(sample, tmp)
    img = root / "concept" / "train" / "train_images.json"
    ref = root / "concept" / "train" / "chelsea" / "cropped" / "3.png"
    ref.write_bytes(ref.read_bytes()[:-40])   # the IEND chunk and the end of the pixel data cut off
    assert img.exists()
    with uses(root):
        load_concept_dataset(root)


def data_not_utf8(sample, tmp, uses):
    root = _copy(sample, tmp)
    path = root / "concept" / "train" / "astro" / "conversations.json"
    path.write_bytes(path.read_text().replace("spacesuit", "spacesuit\u00e9").encode("latin-1"))
    with uses(root):
        load_concept_dataset(root)


def data_unsafe_concept_name(sample, tmp, uses):
    root = _copy(sample, tmp)
    (root / "concepts_list.json").write_text(json.dumps(["astro", "../x"]))
    with uses(tmp):   # the data root and the folder a "../x" concept would escape to
        load_concept_dataset(root)


def data_category_not_derivable(sample, tmp, uses):
    root = _copy(sample, tmp)
    _edit(root / "concept" / "train" / "cuppa" / "info.json",
          lambda d: {k: v for k, v in d.items() if k not in ("conversation_type", "generation_type")})
    with uses(root):
        load_concept_dataset(root)


def data_t2i_conditions_wrong_type(sample, tmp, uses):
    root = _copy(sample, tmp)
    (root / "concept" / "test" / "chelsea" / "t2i_conditions.json").write_text('"A photo of <chelsea>."')
    with uses(root):
        load_concept_dataset(root)


def data_test_item_unknown_type(sample, tmp, uses):
    root = _copy(sample, tmp)
    _edit(root / "test_data" / "astro.json", lambda d: d[:1] + [{**d[0], "type": "caption"}])
    with uses(root):
        load_concept_dataset(root, include_test=True)


def eval_prompts_to_eval_missing(sample, tmp, uses):
    from rl.eval.items import resolve_prompts_to_eval

    with uses(tmp, sample):
        resolve_prompts_to_eval(str(tmp / "prompts_to_eval.json"), sample)


def human_without_face(sample, tmp, uses):
    expert = build_expert("fer", "tiny")
    noise = np.random.default_rng(0).integers(0, 255, (2, 160, 160, 3), dtype=np.uint8)
    with uses(tmp):
        expert.add_reference("astro", list(noise), category="human")


def human_references_without_face_before_ray(sample, tmp, uses):
    from launch.train import prepare

    root = _copy(sample, tmp)
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    for img in (root / "concept" / "train" / "astro").glob("*.png"):
        Image.fromarray(noise).save(img)
    with uses(root, tmp / "runs", TINY_CONFIG):
        prepare(load_config("tiny_cpu", [f"data.root={root}", f"run.output_root={tmp / 'runs'}"]))


def expert_returns_nan(sample, tmp, uses):
    with uses(tmp):
        RewardEnsemble().combine({"tier": np.array([0.5], np.float32), "ber": np.array([np.nan], np.float32),
                                  "der": np.array([0.2], np.float32)}, ["animal"])


def score_batch_wrong_dtype(sample, tmp, uses):
    with uses(tmp):
        ScoreBatch(images=np.zeros((2, 8, 8, 3), np.float32), texts=["a", "b"]).validate()


def score_batch_empty(sample, tmp, uses):
    with uses(tmp):
        ScoreBatch(texts=[]).validate()


CASES = [
    ("config: unknown key", cfg_unknown_key, ConfigError, "run.stepz"),
    ("config: wrong type", cfg_wrong_type, ConfigError, "learner.num_ranks"),
    ("config: malformed YAML", cfg_bad_yaml, ConfigError, "bad.yaml"),
    ("config: top level not a mapping", cfg_not_a_mapping, ConfigError, "list.yaml"),
    ("config: missing file", cfg_missing_file, ConfigError, "nope.yaml"),
    ("config: G < 2", cfg_group_size_one, ConfigError, "group_size"),
    ("config: DSOG step after the last MaskGIT step", cfg_screen_after_end, ConfigError, "screen_step"),
    ("config: unknown reward expert", cfg_unknown_expert, ConfigError, "serve.enabled"),
    ("layout: more CPUs than the cluster", layout_too_many_cpus, PlacementError, "CPU"),
    ("layout: more GPUs than the cluster", layout_too_many_gpus, PlacementError, "GPU"),
    ("resume: missing checkpoint", resume_missing_checkpoint, CheckpointError, "step_000009"),
    ("resume: half-written checkpoint", resume_half_written_checkpoint, CheckpointError, "COMPLETE"),
    ("weights: Show-o file missing", showo_weights_missing, FileNotFoundError, "none.safetensors"),
    ("weights: Show-o shape mismatch", showo_weights_wrong_shape, ValueError, "lm_head.bias"),
    ("weights: concept checkpoint shape mismatch", concept_checkpoint_wrong_shape, ValueError, "epoch_5_embed.pt"),
    ("weights: concept checkpoint missing", concept_checkpoint_missing, FileNotFoundError, "epoch_15"),
    ("weights: tokenizer missing", tokenizer_missing, FileNotFoundError, "phi-1_5"),
    ("weights: DINOv2 (DER) missing", reward_weights_missing_der, FileNotFoundError, "model_path"),
    ("weights: FaceNet (FER) missing", reward_weights_missing_fer, FileNotFoundError, "weights_path"),
    ("data: info.json missing", data_missing_info, DatasetError, "info.json"),
    ("data: malformed JSON", data_bad_json, DatasetError, "info.json"),
    ("data: broken image", data_broken_image, DatasetError, ".png"),
    ("data: empty image", data_empty_image, DatasetError, ".png"),
    ("data: huge image", data_huge_image, DatasetError, ".png"),
    ("data: unknown concept", data_unknown_concept, DatasetError, "nobody"),
    ("data: reasoning answer item missing", data_missing_answer_item, DatasetError, "reasoning.json"),
    ("data: info.json not an object", data_info_wrong_type, DatasetError, "info.json: expected a JSON object"),
    ("data: extra_info not a list", data_extra_info_wrong_type, DatasetError, "'extra_info' must be a list"),
    ("data: empty extra_info with text tasks on", data_empty_extra_info_with_text_tasks, DatasetError,
     "'extra_info' is empty"),
    ("data: no usable reference image", data_no_usable_reference, DatasetError, "train_images.json"),
    ("data: truncated image", data_truncated_image, DatasetError, "3.png"),
    ("data: non-UTF-8 text", data_not_utf8, DatasetError, "not UTF-8"),
    ("data: unsafe concept name", data_unsafe_concept_name, DatasetError, "'../x' is not allowed"),
    ("data: category not derivable", data_category_not_derivable, DatasetError, "category"),
    ("data: t2i_conditions of the wrong type", data_t2i_conditions_wrong_type, DatasetError, "t2i_conditions.json"),
    ("data: test_data item of unknown type", data_test_item_unknown_type, DatasetError, "'caption'"),
    ("eval: prompts_to_eval path missing", eval_prompts_to_eval_missing, DatasetError, "prompts_to_eval"),
    ("data: human concept without a face in its references", human_without_face, ValueError, "astro"),
    ("data: human concept without a face, refused before Ray", human_references_without_face_before_ray, DatasetError,
     "reference photo(s) of human concept 'astro'"),
    ("rewards: expert returns NaN", expert_returns_nan, NonFiniteScoreError, "ber"),
    ("rewards: images of the wrong dtype", score_batch_wrong_dtype, ValueError, "images"),
    ("rewards: empty batch", score_batch_empty, ValueError, "empty"),
]


@pytest.mark.parametrize("name,fn,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly_and_nothing_on_disk_changes(sample, tmp_path, name, fn, exc, fragment):
    before = _tree_digest(sample)
    uses = DiskWatch()
    with pytest.raises(exc) as info:
        fn(sample, tmp_path, uses)
    assert uses.paths, f"{name}: the case must run its failing call inside uses(...)"
    assert fragment.lower() in str(info.value).lower(), f"{name}: message {str(info.value)!r} lacks {fragment!r}"
    assert _tree_digest(sample) == before, f"{name}: the shared sample dataset was modified"


def test_disk_watch_sees_changes_additions_and_removals(tmp_path):
    """The check itself can fail: a changed byte, a new file, a new empty folder or a removed file is reported, even
    when the watched call raised (its error is replaced)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.json").write_text("{}")
    changes = [lambda: (tmp_path / "a" / "f.json").write_text("{ }"), lambda: (tmp_path / "a" / "g").write_text(""),
               lambda: (tmp_path / "a" / "d").mkdir(), lambda: (tmp_path / "a" / "f.json").unlink()]
    for change in changes:
        uses = DiskWatch()
        with pytest.raises(AssertionError, match="changed what it used"):
            with uses(tmp_path / "a"):
                change()
                raise ValueError("the expected error")
    uses = DiskWatch()
    with pytest.raises(AssertionError, match="runs"):
        with uses(tmp_path / "runs"):        # an absent run folder must stay absent
            (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="expected"):
        with DiskWatch()(tmp_path):            # nothing changed: the call's own error comes through
            raise ValueError("expected")
