"""Concept injection (UniCTokens stages 1–3, joint): inits, losses, frozen rows, Ray job -> GRPO rollout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backbone.build import ConceptSpec, build_policy
from backbone.config import ModelConfig
from configs.inject import InjectConfig, load_inject_config
from configs.loader import ConfigError, field_docs, walk_dataclasses
from rl.data.reader import load_concept_dataset
from rl.data.sample import write_sample_dataset
from rl.inject import data as D
from rl.inject import initial_rows as I
from rl.inject.loop import ConceptInjector, StageConfig

CONCEPT = "chelsea"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("inject") / "sample"
    write_sample_dataset(r, image_size=128, log=lambda *_: None)
    return r


@pytest.fixture(scope="module")
def dataset(root):
    return load_concept_dataset(root, concepts=[CONCEPT, "astro"])


def _cfg(root, *overrides) -> InjectConfig:
    return load_inject_config("inject_tiny", [f"data.root={root}", *overrides])


def _policy(cfg, dataset):
    torch.set_num_threads(1)
    return build_policy(cfg.model, [ConceptSpec(c.name, c.info.class_word) for c in dataset.concepts.values()])


def _injector(cfg, dataset, policy=None):
    policy = policy or _policy(cfg, dataset)
    m = cfg.model
    return ConceptInjector(policy, dataset, CONCEPT, cfg.inject, (m.num_understanding_tokens,
                           m.num_generation_tokens, m.num_stage3_tokens), cfg.sampler, cfg.run.seed)


def test_config_fields_documented_and_validated(root):
    for key, cls, f in walk_dataclasses(InjectConfig):
        assert f.name in field_docs(cls), f"{key} has no docstring literal"
    cfg = _cfg(root)
    assert cfg.inject.stages == ["stage1", "stage2", "stage3"]
    d = InjectConfig().inject  # UniCTokens defaults
    assert (d.stage1.lr, d.stage1.weight_decay, d.stage1.eps, d.stage1.epochs, d.stage1.save_every) == \
        (1e-3, 1e-4, 1e-6, 20, 5)
    assert (d.stage2.weight_decay, d.stage2.eps, d.stage2.t2i_weight, d.stage2.mmu_weight) == (1e-3, 1e-8, .8, .2)
    with pytest.raises(ConfigError, match="stage3"):
        _cfg(root, "model.num_stage3_tokens=0")
    with pytest.raises(ConfigError, match="subsequence"):
        _cfg(root, "inject.stages=[stage2,stage1]")
    with pytest.raises(ConfigError, match="concept_checkpoint_dir"):
        _cfg(root, "model.concept_checkpoint_dir=/x", "model.concept_checkpoint_epoch=1")


def test_understanding_items_and_batches(root, dataset):
    items, refs = D.understanding_items(dataset, CONCEPT)
    src = {it.source for it in items}
    assert src == {"recognition_pos", "recognition_neg", "conversation", "profile"}
    assert all(it.image in refs for it in items)
    negs = [it for it in items if it.source == "recognition_neg"]
    assert {it.image.split("/")[0] for it in negs} == {"neg", "random"} and all("not" in it.answer for it in negs)
    cfg = _cfg(root)
    p = _policy(cfg, dataset)
    tok = p.tok
    codes = {k: torch.randint(0, tok.codebook_size, (p.vq.num_tokens,)) for k in refs}
    b = D.build_mmu_batch(tok, items[:3], codes, "<chelsea> is <token_0>.")
    # labels = the answers + eot, right-aligned with the sequence
    L, M = b.input_ids.shape[1], b.labels.shape[1]
    for i, it in enumerate(items[:3]):
        ans = [*tok.encode(" " + it.answer), tok.eot_id]
        assert b.labels[i, M - len(ans):].tolist() == ans == b.input_ids[i, L - len(ans):].tolist()
    grids = torch.randint(0, tok.codebook_size, (4, p.vq.num_tokens))
    t = D.build_t2i_batch(tok, ["A photo of <chelsea>."] * 4, grids, torch.Generator().manual_seed(0))
    img = t.input_ids[:, t.text_len + 1:-1]
    masked = img == tok.mask_id
    assert masked.any(1).all() and (t.labels[:, 0] == tok.soi_id).all() and (t.labels[:, -1] == tok.eoi_id).all()
    assert torch.equal(t.labels[:, 1:-1] != -100, masked)
    assert torch.equal(t.labels[:, 1:-1][masked], grids[masked] + tok.image_offset)
    assert torch.equal(img[~masked], grids[~masked] + tok.image_offset)
    assert D.preview_steps(50) == [10, 35] and D.preview_steps(12) == [2, 8]


def test_kmeans_init_rows_are_cluster_means_of_image_token_rows(root, dataset):
    cfg = _cfg(root)
    inj = _injector(cfg, dataset)
    model, tok = inj.model, inj.tok
    inj.init_groups(("understanding",))
    rows = I.read_rows(model, inj.groups["understanding"]).embed.double()
    assert rows.shape == (16, model.config.hidden_size)
    assert torch.cdist(rows, rows).add(torch.eye(16, dtype=rows.dtype)).min() > 1e-6   # 16 distinct rows
    # independently: encode the training images, take their image-token embedding rows, sklearn KMeans
    from sklearn.cluster import KMeans

    imgs = [r.load() for r in dataset.concept(CONCEPT).train.images]
    codes = inj.policy.vq.encode(imgs).reshape(-1)
    pts = model.model.embed_tokens.weight.detach()[codes + tok.image_offset].double()
    km = KMeans(n_clusters=16, random_state=0, n_init="auto").fit(pts.numpy())
    centers = torch.from_numpy(km.cluster_centers_)
    dist = torch.cdist(rows, centers)
    assert dist.min(1).values.max() < 1e-4 * pts.norm(dim=1).mean()   # each row = an independent centroid
    assert sorted(dist.argmin(1).tolist()) == list(range(16))
    # each row is an exact mean of its members' image-token rows (a point of their convex hull)
    labels = torch.from_numpy(km.labels_)
    member_means = torch.stack([pts[labels == j].mean(0) for j in range(16)])
    assert torch.allclose(member_means[dist.argmin(1)], rows, atol=1e-6)
    # lm_head rows: means of the same members' lm_head rows
    w = model.lm_head.weight.detach()[codes + tok.image_offset].double()
    got = I.read_rows(model, inj.groups["understanding"]).lm_head_weight.double()
    assert torch.allclose(torch.stack([w[labels == j].mean(0) for j in range(16)])[dist.argmin(1)], got,
                          atol=1e-6)


def test_face_init_shape_and_scale():
    fallback = I.InitRows(torch.zeros(8, 96), torch.ones(8, 96), torch.ones(8))
    face = torch.nn.functional.normalize(torch.randn(512), dim=0)
    rows = I.face_token_init(face, 8, 96, fallback, target_norm=2.0)
    assert rows.embed.shape == (8, 96) and torch.allclose(rows.embed.norm(dim=1), torch.full((8,), 2.0))
    # row i is the linear interpolation of face[64 i : 64 (i + 1)] to 96 values
    ref = torch.nn.functional.interpolate(face.view(1, 8, 64), size=96, mode="linear")[0]
    assert torch.allclose(rows.embed / rows.embed.norm(dim=1, keepdim=True), ref / ref.norm(dim=1, keepdim=True))
    assert torch.equal(rows.lm_head_weight, fallback.lm_head_weight)


def test_generation_tokens_face_init_for_humans_only(root, dataset):
    cfg = _cfg(root)
    policy = _policy(cfg, dataset)
    seen = []
    face = torch.nn.functional.normalize(torch.arange(1.0, 513.0), dim=0)

    def embedder(images):
        seen.append(len(images))
        return face

    m = cfg.model
    counts = (m.num_understanding_tokens, m.num_generation_tokens, m.num_stage3_tokens)
    human = ConceptInjector(policy, dataset, "astro", cfg.inject, counts, cfg.sampler, 0, face_embedder=embedder)
    human.init_groups(("generation",))
    gen = I.read_rows(policy.model, human.groups["generation"])
    und = I.read_rows(policy.model, human.groups["understanding"])
    ref = torch.nn.functional.interpolate(face.view(1, 8, 64), size=policy.model.config.hidden_size, mode="linear")[0]
    assert torch.allclose(gen.embed / gen.embed.norm(dim=1, keepdim=True), ref / ref.norm(dim=1, keepdim=True),
                          atol=1e-6)
    assert torch.allclose(gen.embed.norm(dim=1), und.embed.norm(dim=1).mean().expand(8), rtol=1e-5)
    assert seen == [len(dataset.concept("astro").train.images)] and "FaceNet" in human.init_notes["generation"]
    animal = ConceptInjector(policy, dataset, CONCEPT, cfg.inject, counts, cfg.sampler, 0, face_embedder=embedder)
    animal.init_groups(("generation", "stage3"))
    assert len(seen) == 1 and animal.init_notes["generation"].startswith("understanding mean")
    und = I.read_rows(policy.model, animal.groups["understanding"]).embed
    g3 = I.read_rows(policy.model, animal.groups["generation"] + animal.groups["stage3"]).embed
    assert torch.cdist(g3, und.mean(0, keepdim=True)).max() < torch.cdist(und, und.mean(0, keepdim=True)).max()


def _train(inj, stage, epochs):
    inj.begin_stage(stage)
    before = inj.eval_loss()
    for _ in range(epochs):
        inj.run_epoch()
    after = inj.eval_loss()
    inj.end_stage()
    return before, after


def test_stages_lower_their_losses_and_only_concept_rows_change(root, dataset):
    fast = StageConfig(epochs=3, lr=3e-2, weight_decay=1e-3, t2i_weight=0.8, mmu_weight=0.2)
    cfg = _cfg(root, "inject.stage3_data.num_images=1")
    cfg.inject.stage1 = StageConfig(epochs=3, lr=3e-2, weight_decay=1e-4, eps=1e-6, t2i_weight=0.0, mmu_weight=1.0)
    cfg.inject.stage2 = fast
    inj = _injector(cfg, dataset)
    snapshot = {k: v.detach().clone() for k, v in inj.model.state_dict().items()}
    b1, a1 = _train(inj, "stage1", 3)
    assert a1["mmu"] < b1["mmu"] - 0.1, (b1, a1)
    b2, a2 = _train(inj, "stage2", 3)
    assert a2["t2i"] < b2["t2i"] - 0.05, (b2, a2)
    inj.begin_stage("stage3")                     # generation as perception: diff data + 8 more rows
    assert len(inj.stage3_keys) == 2 and all(0 <= v <= 1 for v in inj.extra.values())
    s3 = I.read_rows(inj.model, inj.groups["stage3"]).embed.clone()
    rest = I.read_rows(inj.model, inj.rows(("concept", "understanding", "generation"))).embed.clone()
    inj.run_epoch()
    assert not torch.equal(I.read_rows(inj.model, inj.groups["stage3"]).embed, s3)
    assert torch.equal(I.read_rows(inj.model, inj.rows(("concept", "understanding", "generation"))).embed, rest)
    inj.end_stage()
    trained = set(inj.rows(("concept", "understanding", "generation", "stage3")))
    for k, v in inj.model.state_dict().items():
        changed = (v != snapshot[k]).reshape(v.shape[0], -1).any(1).nonzero().flatten().tolist() if v.dim() else []
        assert set(changed) <= trained, f"{k}: rows {sorted(set(changed) - trained)[:5]} changed"
        if k in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            assert set(changed) == trained
    other = inj.policy.concepts["astro"].all_ids      # the other concept's rows are untouched too
    assert not trained & set(other)


def test_joint_mode_trains_everything_at_once(root, dataset):
    cfg = _cfg(root, "inject.stages=[joint]", "model.num_stage3_tokens=0")
    cfg.inject.joint = StageConfig(epochs=1, lr=1e-2)
    inj = _injector(cfg, dataset)
    plan = inj.begin_stage("joint")
    assert plan.trains == ("concept", "understanding", "generation") and plan.t2i_weight == 0.8
    rec = inj.run_epoch()
    assert {"chelsea/joint/t2i", "chelsea/joint/mmu", "chelsea/joint/loss"} <= set(rec[0])
    inj.end_stage()
    assert inj.init_notes["generation"].startswith("understanding mean")


@pytest.mark.slow
def test_inject_job_then_grpo_rollout_on_the_checkpoint(root, tmp_path, ray_cluster):
    from actors.learner.step import concept_specs
    from actors.rollout.engine import GroupRequest, RolloutEngine
    from actors.rollout.scoring import local_scorer
    from actors.telemetry.logger import read_metrics
    from configs.schema import load_config
    from launch.inject import main

    torch.set_num_threads(1)
    ov = [f"data.root={root}", f"run.output_root={tmp_path}", "run.name=inj", "inject.stages=[stage1,stage2]",
          "model.num_stage3_tokens=0", "inject.stage1.epochs=2", "inject.stage1.save_every=1",
          "inject.stage2.epochs=2", "inject.stage2.save_every=2", "run.tensorboard=false"]
    assert main(["--config", "inject_tiny", *ov]) == 0
    run = tmp_path / "inj"
    recs = read_metrics(run)
    assert {r["stage"] for r in recs} == {"stage1", "stage2"}
    assert all(np.isfinite(r[f"chelsea/{r['stage']}/loss"]) for r in recs)
    s1 = run / "concepts" / "stage1" / CONCEPT
    assert torch.load(s1 / "epoch_2_embed.pt", weights_only=True).shape == (17, 64)     # <c> + 16
    assert (s1 / "epoch_1_embed.pt").is_file() and (s1 / "latest_epoch").read_text().strip() == "2"
    s2 = run / "concepts" / "stage2" / CONCEPT
    assert torch.load(s2 / "epoch_2_lm_head_bias.pt", weights_only=True).shape == (25,)  # <c> + 16 + 8
    summary = json.loads((run / "inject_summary.json").read_text())
    assert f"model.concept_checkpoint_dir={run / 'concepts' / 'stage2'}" in summary["grpo_overrides"]
    # GRPO on the produced checkpoint: the policy loads it, one rollout group runs end to end
    ds = load_concept_dataset(root, concepts=[CONCEPT])
    gcfg = load_config("tiny_cpu", [f"data.root={root}", "rollout.group_size=2", "sampler.timesteps=4",
                                    "dsog.screen_step=2", "rollout.answer_max_new_tokens=4",
                                    *summary["grpo_overrides"][:2]])
    policy = build_policy(gcfg.model, concept_specs(ds))
    assert policy.concept_source[CONCEPT].startswith("checkpoint:")
    saved = torch.load(s2 / "epoch_2_embed.pt", weights_only=True)
    assert torch.equal(policy.model.model.embed_tokens.weight[policy.concepts[CONCEPT].all_ids], saved)
    base = build_policy(ModelConfig.tiny(), concept_specs(ds))
    assert torch.equal(policy.model.model.layers[0].mlp.fc1.weight, base.model.model.layers[0].mlp.fc1.weight)
    res = RolloutEngine(gcfg, policy, ds, local_scorer(gcfg, ds)).generate_group(
        GroupRequest(step=0, prompt_index=0, concept=CONCEPT, threshold=None))
    assert len(res.samples) == 2 and all(np.isfinite(s.reward) for s in res.samples)



@pytest.mark.slow
def test_inject_then_grpo_job_with_the_printed_command(root, tmp_path, ray_cluster, capsys, caplog):
    """The chain as an operator runs it: the injection job prints a `python -m launch.train` line; that line, run
    unchanged (plus a shorter run), trains on the injected rows and logs which checkpoint it loaded."""
    import logging
    import shlex

    from launch.inject import main as inject_main
    from launch.train import main as train_main

    torch.set_num_threads(1)
    ov = [f"data.root={root}", f"run.output_root={tmp_path}", "run.name=inj2", "inject.stages=[stage1,stage2]",
          "model.num_stage3_tokens=0", "inject.stage1.epochs=1", "inject.stage1.save_every=1",
          "inject.stage2.epochs=1", "inject.stage2.save_every=1", "run.tensorboard=false"]
    assert inject_main(["--config", "inject_tiny", *ov]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GRPO job: ")]
    assert len(printed) == 1
    argv = shlex.split(printed[0][len("GRPO job: "):])
    assert argv[:4] == ["python", "-m", "launch.train", "--config"]
    assert f"data.concepts=[{CONCEPT}]" in argv and f"data.root={root}" in argv
    summary = json.loads((tmp_path / "inj2" / "inject_summary.json").read_text())
    assert (tmp_path / "inj2" / "grpo_overrides.txt").read_text().split() == summary["grpo_overrides"]
    caplog.set_level(logging.INFO)
    import importlib.util

    trackers = ["tensorboard"] + [t for t in ("wandb", "mlflow") if importlib.util.find_spec(t) is not None]
    short = [f"run.output_root={tmp_path}", "run.name=grpo", "run.steps=1", "run.image_grid_every=1",
             f"run.trackers=[{','.join(trackers)}]",
             "rollout.group_size=2", "sampler.timesteps=4", "dsog.screen_step=2", "rollout.answer_max_new_tokens=4",
             "objective.max_answer_tokens=4", f"serve.http_port={_free_port()}"]
    assert train_main(argv[3:] + short) == 0
    ckpt = summary["grpo_overrides"][0].split("=", 1)[1]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("concept checkpoint for")]
    assert lines and ckpt in lines[0] and "epoch 1" in lines[0] and "25 rows" in lines[0], lines
    assert "<chelsea> <token_0>" in lines[0] or f"<{CONCEPT}> <token_0>" in lines[0]
    recs = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0] and recs[0]["concepts"] == CONCEPT
    if "mlflow" in trackers:   # the trainer's trackers got the step's scalars, the grid and the reward curves
        from mlflow.tracking import MlflowClient

        from actors.telemetry.trackers import mlflow_store_uri

        client = MlflowClient(tracking_uri=mlflow_store_uri(tmp_path / "grpo"))
        (mrun,) = client.search_runs([client.get_experiment_by_name("unictask-grpo").experiment_id])
        assert mrun.data.metrics["reward/total"] == pytest.approx(recs[0]["reward/total"])
        arts = {a.path for a in client.list_artifacts(mrun.info.run_id)} | {
            a.path for a in client.list_artifacts(mrun.info.run_id, "images")}
        assert {"config.json", "reward_curves.png", "images/step_000001.png"} <= arts
    if "wandb" in trackers:
        assert list((tmp_path / "grpo" / "wandb").glob("offline-run-*/run-*.wandb"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpo_setup_names_the_concept_checkpoint_and_rejects_wrong_token_counts(tmp_path):
    from actors.telemetry.setup_log import concept_checkpoint_lines

    for part, shape in (("embed", (25, 8)), ("lm_head_weight", (25, 8)), ("lm_head_bias", (25,))):
        torch.save(torch.zeros(shape), tmp_path / f"epoch_3_{part}.pt")
    m = ModelConfig.tiny()
    m.concept_checkpoint_dir, m.concept_checkpoint_epoch = str(tmp_path), 3
    m.num_understanding_tokens, m.num_generation_tokens, m.num_stage3_tokens = 16, 8, 0
    (line,) = concept_checkpoint_lines(m, [CONCEPT])
    assert line.startswith(f"concept checkpoint for {CONCEPT}: {tmp_path} epoch 3 (epoch_3_embed.pt")
    assert "25 rows = tokens <chelsea> <token_0> <token_1> <token_2> ... <token_23>" in line
    m.num_stage3_tokens = 8
    with pytest.raises(ValueError, match=r"has 25 rows but the model config asks for 33"):
        concept_checkpoint_lines(m, [CONCEPT])
    m.concept_checkpoint_epoch = 4
    with pytest.raises(FileNotFoundError, match=r"epoch_4_embed.pt"):
        concept_checkpoint_lines(m, [CONCEPT])
