"""Image generation CLI and the export / load round trips (export, merged file, run final/, run checkpoint)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

PROMPT = "A photo of <c> on the beach."


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: 2 cores are shared by several jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Sample data, the tiny config, and a 'trained' policy (weights moved away from the seeded init)."""
    from backbone.build import ConceptSpec, build_policy
    from launch.evaluate import load_cli_config
    from rl.data.reader import load_concept_dataset
    from rl.data.sample import write_sample_dataset

    root = write_sample_dataset(tmp_path_factory.mktemp("data") / "sample", image_size=128, log=lambda *_: None)
    overrides = [f"data.root={root}", "sampler.timesteps=3", "dsog.screen_step=1"]
    cfg = load_cli_config("tiny_cpu", overrides)
    ds = load_concept_dataset(root)
    specs = [ConceptSpec(n, c.info.class_word) for n, c in ds.concepts.items()]
    policy = build_policy(cfg.model, specs)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():   # stand-in for training: every weight moves, so a re-init could never pass for a load
        for p in policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return SimpleNamespace(root=root, cfg=cfg, specs=specs, policy=policy, overrides=overrides)


def _gen(policy, out, cfg, **kw):
    from launch.generate import generate_to_dir

    kw.setdefault("concept", "chelsea")
    return generate_to_dir(policy, PROMPT, out, num=kw.pop("num", 3), seed=kw.pop("seed", 7), sampler_cfg=cfg.sampler,
                           model_cfg=cfg.model, **kw)


def test_generate_writes_the_requested_images_with_the_concept_tokens(env, tmp_path):
    rec = _gen(env.policy, tmp_path / "a", env.cfg, batch_size=2)
    files = sorted(p.name for p in (tmp_path / "a").glob("[0-9]*.png"))
    assert files == ["000.png", "001.png", "002.png"] and (tmp_path / "a" / "grid.png").is_file()
    codes = np.load(tmp_path / "a" / "codes.npy")
    assert codes.shape == (3, env.policy.vq.num_tokens) and codes.dtype == np.int64
    meta = json.loads((tmp_path / "a" / "generation.json").read_text())
    ct = env.policy.concepts["chelsea"]
    # training's T2I phrase: the 16 + 8 tokens, a space, then <chelsea>; only the first mention is expanded
    assert meta["showo_prompt"] == f"A photo of {ct.tokens_text(0, 24)} <chelsea> on the beach."
    assert meta["prompt"] == "A photo of <chelsea> on the beach." and len(set(meta["seeds"])) == 3
    # same seed -> same images whatever the batch size; another seed -> other images
    assert np.array_equal(_gen(env.policy, tmp_path / "b", env.cfg, batch_size=3)["codes"], rec["codes"])
    assert not np.array_equal(_gen(env.policy, tmp_path / "c", env.cfg, seed=8)["codes"], rec["codes"])


def test_prompt_resolution():
    from launch.generate import resolve_prompt

    concepts = {"bo": SimpleNamespace(concept_str="<bo>"), "cat": SimpleNamespace(concept_str="<cat>")}
    assert resolve_prompt("a <cat> on a mat", concepts) == ("cat", "a <cat> on a mat")
    assert resolve_prompt("a <c> here", concepts, "bo") == ("bo", "a <bo> here")
    assert resolve_prompt("a plain dog", concepts) == (None, "a plain dog")
    with pytest.raises(ValueError, match="pass --concept"):
        resolve_prompt("a <c> here", concepts)
    with pytest.raises(ValueError, match="policy has"):
        resolve_prompt("a <c>", concepts, "zz")


def test_export_then_load_gives_the_same_policy_and_the_same_images(env, tmp_path):
    from safetensors import safe_open

    from backbone.build import build_policy
    from backbone.export import MANIFEST_NAME, export_model_config, export_policy, load_exported_policy, read_manifest

    before = _gen(env.policy, tmp_path / "before", env.cfg)["codes"]
    manifest = export_policy(env.policy, tmp_path / "exp", env.cfg.model,
                             class_words={s.name: s.class_word for s in env.specs}, merged=True)
    assert manifest == tmp_path / "exp" / MANIFEST_NAME
    m = read_manifest(tmp_path / "exp")
    assert [c["name"] for c in m["concepts"]] == ["astro", "chelsea", "cuppa"]   # add order = id order
    assert m["concepts"][0]["token_strs"][0] == "<token_0>" and m["concepts"][1]["class_word"] == "cat"
    n_rows = 3 * (env.cfg.model.num_concept_tokens + 1)
    assert m["vocab"]["base_vocab_size"] == env.policy.tok.vocab_size - n_rows
    # Show-o's keys and its own (pre-concept) vocabulary; the concept rows in UniCTokens' files
    with safe_open(str(tmp_path / "exp" / "pytorch_model.safetensors"), "pt") as f:
        assert all(k.startswith(("showo.model.", "showo.lm_head.")) for k in f.keys())
        assert f.get_slice("showo.model.embed_tokens.weight").get_shape()[0] == m["vocab"]["base_vocab_size"]
    rows = torch.load(tmp_path / "exp" / "concepts" / "chelsea" / "epoch_0_embed.pt", weights_only=True)
    ids = env.policy.concepts["chelsea"].all_ids
    assert torch.equal(rows, env.policy.model.model.embed_tokens.weight[ids].float())

    loaded = load_exported_policy(tmp_path / "exp")
    assert _same_weights(loaded, env.policy)
    assert np.array_equal(_gen(loaded, tmp_path / "after", env.cfg)["codes"], before)   # bit-identical ids
    # the plain build_policy path with a ModelConfig pointing at the export
    cfg, specs = export_model_config(tmp_path / "exp")
    assert cfg.showo_path.endswith("pytorch_model.safetensors") and cfg.concept_checkpoint_epoch == 0
    assert _same_weights(build_policy(cfg, specs), env.policy)


def test_merged_file_and_run_final_folder_load_into_the_config_structure(env, tmp_path):
    from backbone.checkpoint import save_showo_state_dict
    from backbone.concepts import save_concept_checkpoint
    from backbone.export import load_policy

    final = tmp_path / "run" / "final"   # what ShowoBackend.export writes
    final.mkdir(parents=True)
    save_showo_state_dict(env.policy.model, final)
    for name, ct in env.policy.concepts.items():
        save_concept_checkpoint(env.policy.model, ct, final / "concepts" / name, 0)
    assert _same_weights(load_policy(final, env.cfg.model, env.specs), env.policy)
    assert _same_weights(load_policy(tmp_path / "run", env.cfg.model, env.specs), env.policy)  # run folder -> final
    with pytest.raises(ValueError, match="rows"):       # another concept list cannot silently load
        load_policy(final, env.cfg.model, env.specs[:2])
    # same number of rows, but another concept list puts them in another order: the concept files catch it
    shifted = ["aaa", "astro", "chelsea"]   # sorted: aaa would get astro's rows, astro chelsea's
    with pytest.raises(ValueError, match="differ from the merged weights"):
        load_policy(final, env.cfg.model, shifted)


def _fake_run(env, run: Path, step: int = 4) -> Path:
    """A run folder with one complete checkpoint in DeepSpeed's layout (module keys 'inner.*') + config.yaml."""
    from backbone.export import DEEPSPEED_MODEL_FILE
    from configs.schema import config_to_dict

    ckpt = run / "checkpoints" / f"step_{step:06d}"
    (ckpt / DEEPSPEED_MODEL_FILE).parent.mkdir(parents=True)
    torch.save({"module": {f"inner.{k}": v.clone() for k, v in env.policy.model.state_dict().items()},
                "ds_version": "0.19"}, ckpt / DEEPSPEED_MODEL_FILE)
    (ckpt / "state.json").write_text(json.dumps({"next_step": step}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config_to_dict(env.cfg), sort_keys=False))
    (ckpt / "COMPLETE").write_text("ok\n")
    return ckpt


def test_run_checkpoint_loads_and_launch_export_round_trips(env, tmp_path, capsys):
    from backbone.export import load_exported_policy, load_policy, resolve_checkpoint
    from launch.export import main as export_main
    from launch.generate import main as generate_main

    ckpt = _fake_run(env, tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "run") == ("run_checkpoint", ckpt)
    (ckpt.parent / "step_000009.old").mkdir()          # a leftover of a re-done step, and an incomplete write
    (ckpt.parent / "step_000009.old" / "COMPLETE").write_text("ok\n")
    (ckpt.parent / "step_000009.old" / "state.json").write_text("{}")
    (ckpt.parent / "step_000010").mkdir()
    assert resolve_checkpoint(tmp_path / "run") == ("run_checkpoint", ckpt)
    (ckpt.parent / "latest").write_text("step_000004\n")
    assert resolve_checkpoint(tmp_path / "run") == ("run_checkpoint", ckpt)
    assert _same_weights(load_policy(ckpt, env.cfg.model, env.specs), env.policy)
    # launch.export with no --config: the run's saved config.yaml gives the structure
    assert export_main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert "exported to" in capsys.readouterr().out
    assert _same_weights(load_exported_policy(tmp_path / "exp"), env.policy)
    # launch.generate from the export = generate from the in-memory policy
    want = _gen(env.policy, tmp_path / "mem", env.cfg, num=2, seed=3)["codes"]
    assert generate_main(["--checkpoint", str(tmp_path / "exp"), "--prompt", "A photo of <chelsea> at home.",
                          "--num", "2", "--seed", "3", "--out", str(tmp_path / "cli"), *env.overrides[1:]]) == 0
    got = np.load(tmp_path / "cli" / "codes.npy")
    assert got.shape == want.shape and sorted(p.name for p in (tmp_path / "cli").glob("0*.png")) == ["000.png",
                                                                                                     "001.png"]
    from launch.generate import generate_to_dir

    ref = generate_to_dir(env.policy, "A photo of <chelsea> at home.", tmp_path / "ref", num=2, seed=3,
                          sampler_cfg=env.cfg.sampler, model_cfg=env.cfg.model)["codes"]
    assert np.array_equal(got, ref)


def test_bad_checkpoints_are_clear_errors(env, tmp_path):
    from backbone.export import load_policy, read_manifest

    with pytest.raises(FileNotFoundError, match="not found"):
        load_policy(tmp_path / "nope", env.cfg.model, env.specs)
    with pytest.raises(FileNotFoundError, match="unictask_export.json"):
        read_manifest(tmp_path)
    ckpt = _fake_run(env, tmp_path / "run")
    torch.save({"module": {"inner.model.embed_tokens.weight": torch.zeros(3, 3)}},
               ckpt / "learner" / "learner" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="keys do not match"):
        load_policy(ckpt, env.cfg.model, env.specs)


@pytest.mark.slow
def test_real_deepspeed_checkpoint_loads_bit_identical(tmp_path):
    """A real DeepSpeed ZeRO-2 save (tag 'learner', UnitForward wrapper) in a subprocess, then load_policy."""
    script = f"""
import os, torch
torch.set_num_threads(1)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29613", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from actors.learner.group import deepspeed_config
from configs.learner import LearnerConfig
from actors.learner.step import UnitForward
from backbone.build import ConceptSpec, build_policy
from backbone.config import ModelConfig
from backbone.export import load_policy
cfg, specs = ModelConfig.tiny(), [ConceptSpec("bo", "dog"), ConceptSpec("cat", "cat")]
pol = build_policy(cfg, specs)
with torch.no_grad():
    for p in pol.model.parameters():
        p.add_(0.01)
eng, *_ = deepspeed.initialize(model=UnitForward(pol.model), optimizer=torch.optim.AdamW(pol.model.parameters()),
                               config=deepspeed_config(LearnerConfig.tiny(), False))
ck = r"{tmp_path}/step_000001"
os.makedirs(ck)
eng.save_checkpoint(ck + "/learner", tag="learner")
open(ck + "/state.json", "w").write("{{}}")
a, b = pol.model.state_dict(), load_policy(ck, cfg, specs).model.state_dict()
assert all(torch.equal(a[k], b[k]) for k in a)
print("IDENTICAL")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=600)
    assert "IDENTICAL" in out.stdout, out.stderr[-3000:]
