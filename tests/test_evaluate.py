"""UnifyBench++ evaluation: metric functions against hand computations, the evaluation on the sample data
(outputs, determinism, limits, judge plug-in), the training-time runner and the launch.evaluate CLI."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rl.eval import metrics as M


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: 2 cores are shared by several jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- metric functions
def test_char_bleu_equals_hand_computation():
    # "abd" vs "abc": unigrams 2/3 clipped matches, bigrams {ab, bd} vs {ab, bc}: 1/2, equal lengths -> BP = 1
    assert M.bleu("abc", "abd") == pytest.approx(math.exp(0.7 * math.log(2 / 3) + 0.3 * math.log(1 / 2)), abs=1e-12)
    # "ax" vs "abc": unigram 1/2, no bigram match -> method 1: 0.1 / 1; BP = exp(1 - 3/2)
    want = math.exp(1 - 3 / 2) * math.exp(0.7 * math.log(1 / 2) + 0.3 * math.log(0.1 / 1))
    assert M.bleu("abc", "ax") == pytest.approx(want, abs=1e-12)
    # longer hypothesis: no brevity penalty; repeated chars are clipped to the reference counts
    # "aab" vs "ab": unigrams a:min(2,1)+b:1 = 2/3; bigrams {aa, ab} vs {ab}: 1/2
    assert M.bleu("ab", "aab") == pytest.approx(math.exp(0.7 * math.log(2 / 3) + 0.3 * math.log(1 / 2)), abs=1e-12)
    assert M.bleu("abc", "xyz") == 0.0 and M.bleu("same text", "same text") == pytest.approx(1.0)


def test_yes_no_parsing_and_weighted_recognition_accuracy():
    assert M.parse_yes_no("Yes, <c> is in this photo.") is True
    assert M.parse_yes_no("no.") is False
    assert M.parse_yes_no("Eyes closed; nothing") is None          # whole words only
    assert M.parse_yes_no("Not sure, but no, yes") is False        # the first yes/no decides
    assert M.recognition_correct("I cannot tell", True) is False   # neither = wrong
    assert M.recognition_correct("NO", False) is True
    # 2 of 3 positives right, 1 of 1 negative right: positives and negatives weigh 1/2 each
    r = M.weighted_accuracy([True, True, False], [True])
    assert r["weighted"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 1.0)
    assert r["acc"] == pytest.approx(3 / 4) and r["pos_acc"] == pytest.approx(2 / 3) and r["neg_acc"] == 1.0
    assert (r["n_pos"], r["n_neg"]) == (3, 1)
    # equivalently: each positive weighs 0.5/n_pos, each negative 0.5/n_neg
    assert r["weighted"] == pytest.approx(sum([0.5 / 3] * 2) + 0.5 / 1)
    assert M.weighted_accuracy([], [False, True])["weighted"] == pytest.approx(0.5)
    assert M.weighted_accuracy([], [])["weighted"] is None


def test_clip_i_and_clip_t_equal_hand_computation_on_a_tiny_random_clip():
    from rewards.clip_score import ClipConfig, ClipExpert

    clip = ClipExpert(ClipConfig.tiny())
    rng = np.random.default_rng(0)
    size = clip.spec.size                                     # fixed images already at CLIP's input size
    gen = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    refs = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    texts = ["A photo of cat.", "a red cup on a table", "woman"]
    clip.add_reference("c", list(refs))

    mean = torch.tensor(clip.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.spec.std).view(1, 3, 1, 1)

    def feats(images):   # by hand: /255, CLIP mean/std, the model's raw image features
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.no_grad():
            return clip.model.encode_image(x).double().numpy()

    with torch.no_grad():
        tf = clip.model.encode_text(clip.tokenizer(texts)).double().numpy()
    g, r = feats(gen), feats(refs)
    unit = lambda v: v / np.linalg.norm(v)                     # noqa: E731
    want_i = np.array([np.mean([unit(g[k]) @ unit(r[j]) for j in range(2)]) for k in range(3)])
    want_t = np.array([unit(g[k]) @ unit(tf[k]) for k in range(3)])
    np.testing.assert_allclose(clip.clip_image_scores(gen, ["c"] * 3), want_i, atol=2e-5)
    np.testing.assert_allclose(clip.clip_text_scores(gen, texts), want_t, atol=2e-5)
    np.testing.assert_allclose(M.clip_i_from_features(g, r), want_i, atol=1e-12)
    np.testing.assert_allclose(M.clip_t_from_features(g, tf), want_t, atol=1e-12)


def test_table_formatting_and_aggregation():
    per = {"a": {"rec": 1.0, "face": 0.5, "vqa": None}, "b": {"rec": 0.5, "face": None}}
    mean = M.aggregate(per)
    assert mean["rec"] == pytest.approx(0.75) and mean["face"] == pytest.approx(0.5) and mean["vqa"] is None
    table = M.markdown_table(per, mean, judge=None, categories={"a": "human", "b": "animal"})
    lines = table.splitlines()
    assert lines[0].startswith("| concept | Rec. (Weight)") and len(lines[0].split("|")) == len(M.METRICS) + 3
    row_b = lines[3].split("|")
    assert row_b[1].strip() == "b" and row_b[-2].strip() == "n/a"   # face does not apply to an animal
    assert "not computed" in lines[2] and "| **mean** | 0.750 |" in table
    assert M.segment_prompt("A photo of a cat, wearing a hat; on grass.") == ["A photo of a cat", "wearing a hat",
                                                                            "on grass"]


# --------------------------------------------------------------------------------------------- on the sample data
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from backbone.build import ConceptSpec, build_policy
    from launch.evaluate import load_cli_config
    from rl.data.reader import load_concept_dataset
    from rl.data.sample import write_sample_dataset
    from rl.eval.evaluate import build_eval_scorers

    root = write_sample_dataset(tmp_path_factory.mktemp("data") / "sample", image_size=128, log=lambda *_: None)
    cfg = load_cli_config("tiny_cpu", [f"data.root={root}", "sampler.timesteps=3", "dsog.screen_step=1",
                                       "eval.max_new_tokens=6", "eval.batch_size=4",
                                       f"run.output_root={tmp_path_factory.mktemp('runs')}"])
    ds = load_concept_dataset(root, include_test=True)
    policy = build_policy(cfg.model, [ConceptSpec(n, c.info.class_word) for n, c in ds.concepts.items()])
    return SimpleNamespace(root=root, cfg=cfg, ds=ds, policy=policy, scorers=build_eval_scorers(cfg, ds))


def test_held_out_reasoning_pairs_and_item_lists(env, tmp_path):
    from rl.eval.evaluate import pure_gen_prompts, rec_items, test_reasoning
    from rl.eval.items import read_prompts_to_eval

    rea = test_reasoning(env.ds, "astro")   # the held-out half of t2i_conditions, index-paired with extra_info
    assert [(r.prompt, r.answer_index) for r in rea] == [("A photo of <astro> at her birthday party.", 3),
                                                         ("A photo of <astro> at work.", 4),
                                                         ("A photo of <astro> with her pet.", 5)]
    dreambench = read_prompts_to_eval(env.root / "prompts_to_eval.json")
    prompts = pure_gen_prompts(env.ds.concept("astro").info, dreambench)   # exactly the list, nothing mixed in
    assert prompts == ["a <astro> in the snow", "a <astro> on the beach", "a <astro> wearing a red hat"]
    rec = rec_items(env.ds, "chelsea")
    assert [r.path.parent.name for r, y in rec if y] == ["chelsea", "chelsea"]
    negs = [(r.path.parent.name, r.name) for r, y in rec if not y]
    assert negs[:3] == [("astro", "0.png"), ("cuppa", "0.png"), ("random_images", "0.png")] and len(negs) == 8


def test_evaluate_writes_json_markdown_grid_and_is_deterministic(env, tmp_path):
    from rl.eval.evaluate import evaluate_policy, flat_metrics, write_eval_outputs

    res = evaluate_policy(env.cfg, env.policy, env.ds, env.scorers, limit=1, step=7)
    paths = write_eval_outputs(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert set(data["concepts"]) == {"astro", "chelsea", "cuppa"} and data["step"] == 7
    for name, r in data["concepts"].items():
        m = r["metrics"]
        photo = 1 if r["category"] == "human" else 0   # face: the released "A photo of <c>." images
        assert r["counts"] == {"rec_pos": 1, "rec_neg": 1, "vqa": 1, "qa": 1, "choice": 0, "rea": 1,
                               "images": 2 + photo}, name
        for key in ("rec", "vqa", "qa", "rea", "pure_gen_clip_i", "pure_gen_clip_t", "rea_gen_clip_i",
                    "rea_gen_clip_t"):
            assert m[key] is not None and math.isfinite(m[key]), (name, key)
        assert m["dense_rea"] is None and m["dense_gen"] is None
        for it in r["items"]["vqa"] + r["items"]["qa"] + r["items"]["rea"]:   # the metric is the BLEU of the item
            assert it["bleu"] == pytest.approx(M.bleu(it["reference"], it["answer"]))
        assert [g["kind"] for g in r["items"]["generation"]] == ["pure"] + ["photo"] * photo + ["rea"]
        assert (tmp_path / "out" / r["items"]["generation"][0]["file"]).is_file()
    astro = data["concepts"]["astro"]
    assert astro["category"] == "human" and "face" in astro["notes"]     # random model: no face in its images
    assert data["mean"]["rec"] == pytest.approx(np.mean([r["metrics"]["rec"] for r in data["concepts"].values()]))
    assert data["not_computed"] == {"dense_rea": "no judge configured (eval.judge)",
                                    "dense_gen": "no judge configured (eval.judge)"}
    md = paths["markdown"].read_text()
    assert md.count("not computed") >= 8 and "| astro |" in md and "| **mean** |" in md
    grid = Image.open(paths["grid"])
    cell = env.cfg.eval.grid_cell
    assert grid.size == (3 * cell, 3 * (cell + 28))
    # the eval's CLIP-I of a generated image = the hand computation from the returned image
    img = res["concepts"]["cuppa"]["_images"][:1]
    refs = [r.load() for r in env.ds.concept("cuppa").train.references]
    with torch.no_grad():
        f = env.scorers.clip.image_features(img).double().numpy()
        fr = env.scorers.clip.image_features(refs).double().numpy()
    assert data["concepts"]["cuppa"]["items"]["generation"][0]["clip_i"] == pytest.approx(
        float(M.clip_i_from_features(f, fr)[0]), abs=1e-5)
    # deterministic: a second run (other batch size) gives the same answers, images and metrics
    env.cfg.eval.batch_size = 1
    try:
        again = evaluate_policy(env.cfg, env.policy, env.ds, env.scorers, limit=1, step=7)
    finally:
        env.cfg.eval.batch_size = 4
    for name in res["concepts"]:
        assert np.array_equal(again["concepts"][name]["_codes"], res["concepts"][name]["_codes"])
        assert again["concepts"][name]["items"]["rea"] == res["concepts"][name]["items"]["rea"]
    flat = flat_metrics(res)
    assert flat["eval/rec"] == pytest.approx(data["mean"]["rec"]) and "eval/astro/vqa" in flat
    assert not any(k.endswith("dense_rea") for k in flat)


class _FakeJudge:
    name = "fake"

    def answer_score(self, question, answer, reference):
        return 0.25

    def segment_scores(self, image, segments):
        return [1.0 if i == 0 else 0.0 for i in range(len(segments))]


def test_pluggable_judge_fills_the_dense_metrics(env, tmp_path):
    from rl.eval.evaluate import EvalScorers, evaluate_policy, write_eval_outputs
    from rl.eval.judge import Judge, build_judge, judge_names, register_judge, unregister_judge

    assert build_judge(None) is None and build_judge("none") is None
    with pytest.raises(ValueError, match="unknown judge"):
        build_judge("fake")
    register_judge("fake", _FakeJudge)
    try:
        assert "fake" in judge_names() and isinstance(build_judge("fake"), Judge)
        scorers = EvalScorers(clip=env.scorers.clip, judge=build_judge("fake"))
        res = evaluate_policy(env.cfg, env.policy, env.ds, scorers, limit=1, concepts=["cuppa"])
        m = res["concepts"]["cuppa"]["metrics"]
        last = res["concepts"]["cuppa"]["items"]["generation"][-1]   # judged on its t2i_conditions prompt
        segs = M.segment_prompt(last["judge_prompt"].replace("<cuppa>", env.ds.concept("cuppa").info.class_word))
        assert m["dense_rea"] == 0.25 and m["dense_gen"] == pytest.approx(1 / len(segs))
        assert res["judge"] == "fake" and res["not_computed"] == {}
        md = write_eval_outputs(res, tmp_path)["markdown"].read_text()
        assert "not computed" not in md.split("\n\n")[1] and "0.250" in md
        bad = type("Bad", (_FakeJudge,), {"answer_score": lambda self, q, a, r: 1.5})()
        with pytest.raises(ValueError, match="outside"):
            evaluate_policy(env.cfg, env.policy, env.ds, EvalScorers(judge=bad), limit=1, concepts=["cuppa"])
    finally:
        unregister_judge("fake")


def test_worker_evaluate_runner_for_the_training_loop(env):
    from rl.eval.evaluate import worker_evaluate

    worker = SimpleNamespace(cfg=env.cfg, policy=env.policy, device="cpu")
    env.cfg.eval.train_limit = 1
    env.policy.model.train()
    try:
        out = worker_evaluate(worker, 5)
        assert env.policy.model.training   # evaluated in eval mode, the caller's mode restored
    finally:
        env.policy.model.eval()
    assert worker._eval_runner is not None and all(k.startswith("eval/") for k in out)
    assert {"eval/rec", "eval/pure_gen_clip_i", "eval/chelsea/rea"} <= set(out)
    run_eval = env.cfg.run_dir / "eval" / "step_000005"
    assert (run_eval / "results.json").is_file() and (run_eval / "grid.png").is_file()


def test_launch_evaluate_cli(env, tmp_path, capsys):
    from launch.evaluate import main

    rc = main(["--config", "tiny_cpu", "--out", str(tmp_path / "ev"), "--limit", "1", "--concepts", "cuppa",
               f"data.root={env.root}", "sampler.timesteps=2", "dsog.screen_step=1", "eval.max_new_tokens=4",
               "eval.face=false", f"eval.prompts_to_eval={env.root / 'prompts_to_eval.json'}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| cuppa |" in printed and "not computed" in printed
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(data["concepts"]) == ["cuppa"] and data["checkpoint"] is None
    assert data["settings"]["sampler"]["timesteps"] == 2 and (tmp_path / "ev" / "grid.png").is_file()
