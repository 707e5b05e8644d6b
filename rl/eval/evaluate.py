"""UnifyBench++ evaluation of a policy on the held-out ``test/`` data (no Ray): metrics, JSON, Markdown, PNG grid.

Per concept (metric definitions in :mod:`rl.eval.metrics`, items in :mod:`rl.eval.items`), every answer greedy with
``eval.max_new_tokens`` (UniCTokens: 100), prompts in the run's ``data.prompt_style`` (:mod:`rl.grpo.tasks`):

* **Rec. / VQA / QA / choice**: ``test_data/<c>.json`` as ``eval/eval_p_mmu.py`` reads it (questions behind the
  style's system prompt); without it, "Is <c> in this photo?" (``eval.rec_question``) on the concept's test photos
  (positives) and the other concepts' test photos + ``random_images/`` (negatives), ``test/<c>/vqa.json`` and
  ``text_only.json``. Rec.: weighted accuracy; VQA / QA: char BLEU; choice: reference contained in the answer.
* **Rea.**: the text-only reasoning task on the held-out half of ``t2i_conditions.json`` (index-paired with
  extra_info as the released grpo.py pairs the training half), BLEU against the correct extra_info item.
* **Pure Gen.**: exactly the released DreamBench list (``eval.prompts_to_eval``, by generation_type, ``<sks>`` →
  ``<c>``); CLIP-I to the reference images (train_images.json), CLIP-T to the prompt with tokens stripped and
  ``<c>`` → class word (as eval/clip_eval.py). **Face** (human concepts): FER over images of "A photo of <c>." (the
  released face evaluation's prompt) where a face is detected.
* **Rea. Gen.**: images from CP = IP + the model's own reasoning answer; CLIP-I, and CLIP-T against the explicit
  prompt IP + the correct item (the paper: "replace the inferential part with specific details").
* **Dense Rea. / Dense Gen.**: only with a judge (:mod:`rl.eval.judge`, e.g. the OpenAI-compatible one). Dense Gen.
  images come from the t2i_conditions lists whose key contains "dense", else from the Rea. Gen. prompts; the judge is
  sent the ``t2i_conditions`` prompt itself, as written (``<c>`` and all), as the released ``eval/4o_judge_t2i.py``
  does, never the explicit prompt with the correct extra_info item (that would hand the judge the answer). Dense
  Rea. sends the judge the question as ``eval/eval_p_mmu.py`` does: the style's system prompt + the prompt.

Deterministic: greedy answers; image ``j`` of prompt ``i`` of kind ``k`` draws only from
``make_generator(sample_seed(eval.seed, 0, i, j, 0, f"eval/{concept}/{k}"))`` (rl.grpo.seeding, D7), so results
do not depend on batching, on the other concepts, or on the training step.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone.answer import generate_answers
from backbone.maskgit import MaskGITSampler
from backbone.prompts import build_mmu_inputs, build_t2i_inputs
from rl.data.reader import ConceptDataset, DatasetError, load_image
from rl.eval import metrics as M
from rl.eval.config import EvalConfig
from rl.eval.items import (
    PHOTO_PROMPT,
    cap,
    pure_gen_prompts,
    rec_items,
    resolve_prompts_to_eval,
    system_question,
    test_reasoning,
    understanding_items,
)
from rl.eval.judge import Judge, build_judge, check_judge_score
from rl.eval.perceptual import build_perceptual_scorer, perceptual_metrics
from rl.grpo.seeding import make_generator, sample_seed
from rl.grpo.tasks import (
    ConceptPromptTokens,
    UnderstandingTask,
    build_compound_prompt,
    build_understanding_prompt,
    clean_ir,
    compound_fixed_part,
    expand_concept,
    reward_prompt,
    text_budget,
)

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "EvalScorers", "build_eval_scorers", "test_reasoning", "rec_items", "pure_gen_prompts",
           "generate_images", "evaluate_policy", "flat_metrics", "write_eval_outputs", "EvalRunner",
           "worker_evaluate"]


@dataclass
class EvalScorers:
    """The models behind the generation metrics (each optional: a missing one leaves its metrics None)."""

    clip: Any = None
    """rewards.clip_score.ClipExpert with reference features of every concept (its training images)."""
    fer: Any = None
    """rewards.fer.FerExpert with references of the human concepts."""
    judge: Judge | None = None
    """Judge for Dense Rea. / Dense Gen."""
    perceptual: Any = None
    """UniPercept (rl.eval.perceptual) when serve.enabled includes it: IAA / IQA / ISTA of the generated images."""
    notes: dict[str, str] = field(default_factory=dict)
    """Why a scorer is missing (e.g. a human concept without a detectable reference face)."""


def _eval_cfg(cfg) -> EvalConfig:
    ecfg = cfg.eval
    ecfg.validate()
    return ecfg


def build_eval_scorers(cfg, dataset: ConceptDataset, device: str | torch.device | None = None) -> EvalScorers:
    """CLIP and FER from ``cfg.serve.clip`` / ``cfg.serve.fer`` (device overridable), references = the training
    images; the judge from ``cfg.eval.judge``."""
    import dataclasses

    from rewards.registry import build_expert

    ecfg = _eval_cfg(cfg)
    out = EvalScorers(judge=build_judge(ecfg.judge, **ecfg.judge_options))
    out.perceptual = build_perceptual_scorer(cfg, device)

    def expert(name: str):
        c = cfg.serve.expert(name).expert_config(name)
        return build_expert(name, dataclasses.replace(c, device=str(device)) if device is not None else c)

    if ecfg.clip:
        out.clip = expert("clip")
        for name, c in dataset.concepts.items():
            out.clip.add_reference(name, [r.load() for r in c.train.references])
    humans = {n: c for n, c in dataset.concepts.items() if c.info.category == "human"}
    if ecfg.face and humans:
        out.fer = expert("fer")
        for name, c in humans.items():
            try:
                out.fer.add_reference(name, [r.load() for r in c.train.references], category="human")
            except ValueError as exc:  # no face in any reference image
                out.notes[f"face/{name}"] = str(exc)
    return out


# ------------------------------------------------------------------------------------------------ model calls
def _answers(policy, questions: list[tuple[np.ndarray, str]], ecfg: EvalConfig) -> list[str]:
    """Greedy answers to (image, question) pairs, batched."""
    out: list[str] = []
    cache: dict[int, torch.Tensor] = {}
    for s in range(0, len(questions), ecfg.batch_size):
        chunk = questions[s:s + ecfg.batch_size]
        ids = []
        for img, _ in chunk:
            if id(img) not in cache:
                cache[id(img)] = policy.vq.encode(img[None])[0]
            ids.append(cache[id(img)])
        mmu = build_mmu_inputs(policy.tok, torch.stack(ids), [q for _, q in chunk])
        res = generate_answers(policy.model, policy.tok, mmu, max_new_tokens=ecfg.max_new_tokens, greedy=True)
        out += [clean_ir(t) for t in res.texts]
    return out


def generate_images(policy, texts: list[str], seeds: list[int], sampler_cfg, max_text_len: int = 128,
                    batch_size: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """MaskGIT images of the Show-o prompts ``texts`` (concept already expanded), one seed each (rl.grpo.seeding
    values): (code ids long [B, N] on CPU, uint8 [B, H, W, 3]). Batching does not change the results (D7)."""
    sampler = MaskGITSampler(policy.model, policy.tok, sampler_cfg)
    dev = policy.model.device
    ids = []
    for s in range(0, len(texts), batch_size):
        t2i = build_t2i_inputs(policy.tok, texts[s:s + batch_size], policy.vq.num_tokens, max_text_len=max_text_len)
        state = sampler.generate(t2i, [make_generator(x, device=dev) for x in seeds[s:s + batch_size]])
        ids.append(state.final_ids.cpu())
    ids = torch.cat(ids) if ids else torch.zeros(0, policy.vq.num_tokens, dtype=torch.long)
    return ids, policy.vq.decode_uint8(ids.to(dev)) if len(ids) else np.zeros((0, 1, 1, 3), np.uint8)


# ------------------------------------------------------------------------------------------------ evaluation
def _concept(cfg, ecfg, policy, dataset, scorers: EvalScorers, name: str, limit: int | None,
             dreambench: dict[str, list[str]]) -> dict:
    c = dataset.concept(name)
    info, test = c.info, c.test
    if test is None:
        raise DatasetError(f"concept {name!r} has no test data: load the dataset with include_test=True")
    tokens = ConceptPromptTokens.from_concept_tokens(policy.concepts[name], cfg.model.num_understanding_tokens,
                                                     cfg.model.num_generation_tokens)
    black = dataset.black()
    loaded: dict[str, np.ndarray] = {}

    def img(ref) -> np.ndarray:   # an ImageRef or a test_data image path
        path = getattr(ref, "path", ref)
        if str(path) not in loaded:
            loaded[str(path)] = ref.load() if hasattr(ref, "load") else load_image(path, reader)
        return loaded[str(path)]

    style = getattr(getattr(cfg, "data", None), "prompt_style", "released")
    reader = getattr(getattr(cfg, "data", None), "reader", None)
    mmu = understanding_items(dataset, name, ecfg, limit)
    rea_prompts = cap(test_reasoning(dataset, name), ecfg.max_rea, limit)
    tasks = [UnderstandingTask(kind="text", concept=name, category=info.category, class_word=info.class_word,
                               image=black, image_name=dataset.black_image.name, question=rp.prompt,
                               reference=info.extra_info[rp.answer_index], gen_prompt=rp.prompt,
                               candidates=list(info.extra_info), target_index=rp.answer_index, profile=info.info,
                               style=style) for rp in rea_prompts]
    questions = ([(img(x.image), system_question(x.question, tokens, style)) for x in mmu]
                 + [(black, build_understanding_prompt(t, tokens)) for t in tasks])
    answers = _answers(policy, questions, ecfg)
    a_mmu, a_rea = answers[:len(mmu)], answers[len(mmu):]
    image_key = lambda ref: str(Path(getattr(ref, "path", ref)).relative_to(dataset.root))  # noqa: E731
    items: dict[str, list] = {
        "rec": [{"image": image_key(x.image), "expected": "yes" if x.expected_yes else "no", "answer": a,
                 "correct": M.recognition_correct(a, x.expected_yes)} for x, a in zip(mmu, a_mmu) if x.kind == "rec"],
        "vqa": [{"image": image_key(x.image), "question": x.question, "reference": x.reference, "answer": a,
                 "bleu": M.bleu(x.reference, a)} for x, a in zip(mmu, a_mmu) if x.kind == "vqa"],
        "qa": [{"question": x.question, "reference": x.reference, "answer": a, "bleu": M.bleu(x.reference, a)}
               for x, a in zip(mmu, a_mmu) if x.kind == "qa"],
        "choice": [{"image": image_key(x.image), "question": x.question, "reference": x.reference, "answer": a,
                    "correct": x.reference in a} for x, a in zip(mmu, a_mmu) if x.kind == "choice"],
        "rea": [{"prompt": t.question, "reference": t.reference, "answer": a, "bleu": M.bleu(t.reference, a)}
                for t, a in zip(tasks, a_rea)]}
    recog = M.weighted_accuracy([it["correct"] for it in items["rec"] if it["expected"] == "yes"],
                                [it["correct"] for it in items["rec"] if it["expected"] == "no"])
    # ---- generation jobs: (kind, prompt index, Show-o text, CLIP-T text, judge prompt: the t2i_conditions prompt
    # as written, as the released 4o judge sends it; None = not judged)
    budget = text_budget(cfg.rollout.max_text_len)
    jobs = [("pure", i, expand_concept(p, tokens), reward_prompt(p, tokens, info.class_word), None)
            for i, p in enumerate(cap(pure_gen_prompts(info, dreambench), ecfg.max_gen_prompts, limit))]
    if info.category == "human" and scorers.fer is not None:   # the released face eval's prompt
        photo = PHOTO_PROMPT.replace("<c>", info.token)
        jobs.append(("photo", 0, expand_concept(photo, tokens), reward_prompt(photo, tokens, info.class_word), None))
    for i, (t, a) in enumerate(zip(tasks, a_rea)):
        explicit = reward_prompt(f"{compound_fixed_part(t, tokens)} {t.reference}", tokens, info.class_word)
        jobs.append(("rea", i, build_compound_prompt(t, a, tokens, policy.tok, budget=budget)[0], explicit,
                     t.gen_prompt))
    dense = [p for k, v in test.t2i_conditions.items() if "dense" in k.lower() for p in v]
    if scorers.judge is not None:
        jobs += [("dense", i, expand_concept(p, tokens) if info.token in p else p,
                  reward_prompt(p, tokens, info.class_word), p)
                 for i, p in enumerate(cap(dense, ecfg.max_gen_prompts, limit))]
    flat = [(job, j) for job in jobs for j in range(ecfg.images_per_prompt)]
    seeds = [sample_seed(ecfg.seed, 0, job[1], j, 0, f"eval/{name}/{job[0]}") for job, j in flat]
    codes, images = generate_images(policy, [job[2] for job, _ in flat], seeds, cfg.sampler,
                                    cfg.rollout.max_text_len, ecfg.batch_size)
    gen = [{"kind": job[0], "prompt_index": job[1], "image_index": j, "seed": s, "prompt": job[2],
            "clip_text": job[3], "judge_prompt": job[4]} for (job, j), s in zip(flat, seeds)]
    kinds = np.array([g["kind"] for g in gen])
    metrics: dict[str, Any] = {"rec": recog["weighted"], "vqa": M.mean_or_none(x["bleu"] for x in items["vqa"]),
                               "qa": M.mean_or_none(x["bleu"] for x in items["qa"]),
                               "rea": M.mean_or_none(x["bleu"] for x in items["rea"])}
    notes: dict[str, str] = {}
    if scorers.clip is not None and len(gen):
        ci = scorers.clip.clip_image_scores(images, [name] * len(gen))
        ct = scorers.clip.clip_text_scores(images, [g["clip_text"] for g in gen])
        for g, a, b in zip(gen, ci, ct):
            g.update(clip_i=float(a), clip_t=float(b))
        for kind in ("pure", "rea"):
            sel = kinds == kind
            metrics[f"{kind}_gen_clip_i"] = float(ci[sel].mean()) if sel.any() else None
            metrics[f"{kind}_gen_clip_t"] = float(ct[sel].mean()) if sel.any() else None
    else:
        notes["clip"] = "no CLIP scorer (eval.clip=false)" if scorers.clip is None else "no images"
    metrics["face"] = None
    if info.category == "human":
        pure = [i for i, g in enumerate(gen) if g["kind"] == "photo"]
        if scorers.fer is None or f"face/{name}" in scorers.notes:
            notes["face"] = scorers.notes.get(f"face/{name}", "no face scorer (eval.face=false)")
        elif pure:
            found = [i for i, d in zip(pure, scorers.fer.detect(images[pure])) if d is not None]
            metrics["face_detect_rate"] = len(found) / len(pure)
            if found:
                from rewards.base import ScoreBatch

                sc = scorers.fer.score(ScoreBatch(images=images[found], concepts=[name] * len(found)))
                metrics["face"] = float(np.mean(sc))
            else:
                notes["face"] = f"no face detected in the {len(pure)} '{PHOTO_PROMPT}' image(s)"
    queries = [system_question(t.question, tokens, style) for t in tasks]   # eval_p_mmu.py: system prompt + question
    _judge(scorers.judge, tasks, queries, a_rea, gen, images, metrics, notes, bool(dense), info)
    metrics.update(perceptual_metrics(scorers.perceptual, images, gen))
    metrics.update(rec_pos_acc=recog["pos_acc"], rec_neg_acc=recog["neg_acc"], rec_acc=recog["acc"])
    if items["choice"]:
        metrics["choice"] = M.mean_or_none(float(x["correct"]) for x in items["choice"])
    counts = {"rec_pos": recog["n_pos"], "rec_neg": recog["n_neg"], "vqa": len(items["vqa"]), "qa": len(items["qa"]),
              "choice": len(items["choice"]), "rea": len(tasks), "images": len(gen)}
    return {"category": info.category, "class_word": info.class_word, "metrics": metrics, "counts": counts,
            "notes": notes, "items": {**items, "generation": gen}, "_images": images, "_codes": codes}


def _judge(judge, tasks, queries, answers, gen, images, metrics, notes, has_dense: bool, info) -> None:
    """Dense Rea. (each reasoning answer against its fact, asked with ``queries``) and Dense Gen. (each judged image
    against its ``judge_prompt``: the t2i_conditions prompt as written)."""
    metrics["dense_rea"] = metrics["dense_gen"] = None
    if judge is None:
        notes["judge"] = "not computed: no judge configured (eval.judge)"
        return
    scores = [check_judge_score(judge.answer_score(q, a, t.reference), judge.name, "answer_score")
              for q, t, a in zip(queries, tasks, answers)]
    metrics["dense_rea"] = M.mean_or_none(scores)
    kind = "dense" if has_dense else "rea"
    per_image = []
    block = None
    if hasattr(judge, "image_score"):   # the released 4o judge: whole image vs prompt and the concept's profile
        from rl.eval.judge_openai import concept_info_text

        block = concept_info_text(info.name, info.info, info.extra_info)
    for i, g in enumerate(gen):
        if g["kind"] == kind and block is not None:
            g["judge"] = check_judge_score(judge.image_score(images[i], g["judge_prompt"], block), judge.name,
                                           "image_score")
            per_image.append(g["judge"])
        elif g["kind"] == kind:
            # no concept block here: the judge reads the prompt with the class word for <c> (as CLIP-T does)
            segs = M.segment_prompt(g["judge_prompt"].replace(info.token, info.class_word))
            vals = [check_judge_score(v, judge.name, "segment_scores") for v in judge.segment_scores(images[i], segs)]
            if len(vals) != len(segs):
                raise ValueError(f"judge {judge.name!r}: segment_scores gave {len(vals)} scores for {len(segs)} "
                                 "segments")
            g["judge"] = M.mean_or_none(vals)
            per_image.append(g["judge"])
    metrics["dense_gen"] = M.mean_or_none(per_image)
    notes["dense_gen_prompts"] = "t2i_conditions dense lists" if has_dense else "Rea. Gen. explicit prompts"


def evaluate_policy(cfg, policy, dataset: ConceptDataset, scorers: EvalScorers | None = None,
                    limit: int | None = None, step: int | None = None, concepts: list[str] | None = None,
                    keep_images: bool = True) -> dict:
    """Evaluate ``policy`` on ``dataset`` (loaded with include_test=True). ``cfg``: TrainConfig-like (``model``
    token counts, ``sampler``, ``rollout.max_text_len``, ``serve`` for the scorers, optional ``eval``);
    ``scorers``: None = :func:`build_eval_scorers`; ``limit`` caps every per-concept list. Returns a JSON-able
    dict (plus "_images" / "_codes" per concept when ``keep_images``): ``concepts`` → metrics / counts / items,
    ``mean`` over concepts, ``not_computed`` notes, ``settings``."""
    ecfg = _eval_cfg(cfg)
    scorers = scorers if scorers is not None else build_eval_scorers(cfg, dataset, device=policy.model.device)
    names = list(concepts or dataset.concepts)
    dreambench, dreambench_source = resolve_prompts_to_eval(ecfg.prompts_to_eval, dataset.root)
    was_training = policy.model.training
    policy.model.eval()
    t0 = time.perf_counter()
    per: dict[str, dict] = {}
    try:
        with torch.no_grad():
            for name in names:
                t = time.perf_counter()
                per[name] = _concept(cfg, ecfg, policy, dataset, scorers, name, limit, dreambench)
                per[name]["seconds"] = time.perf_counter() - t
    finally:
        policy.model.train(was_training)
    if not keep_images:
        for r in per.values():
            r.pop("_images"), r.pop("_codes")
    mean = M.aggregate({n: r["metrics"] for n, r in per.items()})
    not_computed = {k: "no judge configured (eval.judge)" for k in M.JUDGED if scorers.judge is None}
    return {"step": step, "judge": getattr(scorers.judge, "name", None), "concepts": per, "mean": mean,
            "not_computed": not_computed, "seconds": time.perf_counter() - t0,
            "settings": {"eval": asdict(ecfg), "limit": limit, "sampler": asdict(cfg.sampler),
                         "prompts_to_eval": dreambench_source,
                         "max_text_len": cfg.rollout.max_text_len}}


def flat_metrics(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """``{prefix+metric: mean, prefix+concept/metric: value}`` for the computed headline metrics (logging)."""
    out = {f"{prefix}{k}": float(v) for k, v in result["mean"].items() if v is not None}
    for name, r in result["concepts"].items():
        out.update({f"{prefix}{name}/{k}": float(v) for k, v in r["metrics"].items() if v is not None})
    out[f"{prefix}seconds"] = float(result["seconds"])
    return out


# ------------------------------------------------------------------------------------------------ outputs
def save_grid(path: Path, rows: list[tuple[str, list[tuple[np.ndarray, str]]]], cell: int = 128) -> Path:
    """A PNG grid: one row per (label, [(image, caption)]), the label written in each caption."""
    from PIL import Image, ImageDraw

    cols = max((len(r[1]) for r in rows), default=1) or 1
    cap = 28
    grid = Image.new("RGB", (cols * cell, max(1, len(rows)) * (cell + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, cells) in enumerate(rows):
        for c, (im, caption) in enumerate(cells):
            x, y = c * cell, r * (cell + cap)
            grid.paste(Image.fromarray(np.asarray(im, np.uint8)).resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + 2, y + cell + 1), f"{label} {caption}"[:cell // 6], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_eval_outputs(result: dict, out_dir: str | Path, title: str = "UnifyBench++ evaluation") -> dict[str, Path]:
    """results.json, results.md (the table) and grid.png (+ images/<concept>/*.png) into ``out_dir``."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, r in result["concepts"].items():
        images = r.get("_images")
        if images is None:
            continue
        cells = []
        for g, im in zip(r["items"]["generation"], images):
            f = out / "images" / name / f"{g['kind']}_{g['prompt_index']:03d}_{g['image_index']:02d}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(f)
            g["file"] = str(f.relative_to(out))
            cells.append((im, f"{g['kind']}{g['prompt_index']}"))
        rows.append((name, cells))
    clean = {**result, "concepts": {n: {k: v for k, v in r.items() if not k.startswith("_")}
                                    for n, r in result["concepts"].items()}}
    (out / "results.json").write_text(json.dumps(clean, indent=2, default=float) + "\n")
    cats = {n: r["category"] for n, r in result["concepts"].items()}
    table = M.markdown_table({n: r["metrics"] for n, r in result["concepts"].items()}, result["mean"],
                             result.get("judge"), cats)
    step = "" if result.get("step") is None else f" (step {result['step']})"
    (out / "results.md").write_text(f"# {title}{step}\n\n{table}")
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    if rows:
        ecell = result.get("settings", {}).get("eval", {}).get("grid_cell", 128)
        paths["grid"] = save_grid(out / "grid.png", rows, cell=int(ecell))
    return paths


class EvalRunner:
    """The periodic held-out evaluation inside a rollout actor: test dataset and scorers built once."""

    def __init__(self, cfg, policy, device: str | torch.device | None = None, dataset: ConceptDataset | None = None,
                 scorers: EvalScorers | None = None):
        from rl.data.reader import load_dataset

        self.cfg, self.policy = cfg, policy
        self.dataset = dataset or load_dataset(cfg.data, include_test=True)
        self.scorers = scorers or build_eval_scorers(cfg, self.dataset, device=device)

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate the current weights (capped by eval.train_limit); flat ``eval/*`` metrics."""
        ecfg = _eval_cfg(self.cfg)
        res = evaluate_policy(self.cfg, self.policy, self.dataset, self.scorers, limit=ecfg.train_limit, step=step)
        if ecfg.write_during_training:
            write_eval_outputs(res, Path(self.cfg.run_dir) / "eval" / f"step_{step:06d}")
        return flat_metrics(res)


def worker_evaluate(worker, step: int) -> dict[str, float]:
    """``RolloutWorker.evaluate(step)``: an :class:`EvalRunner` over ``worker.cfg`` / ``worker.policy`` (cached on
    the worker), run at ``step``."""
    runner = getattr(worker, "_eval_runner", None)
    if runner is None:
        runner = worker._eval_runner = EvalRunner(worker.cfg, worker.policy, device=getattr(worker, "device", None))
    return runner(step)
