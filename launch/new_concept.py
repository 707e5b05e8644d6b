r"""Bring your own concept: a folder of photos (+ a profile and facts) → a concept in the released UniCTokens layout.

examples:
    python -m launch.new_concept --photos ~/photos/rex --name rex --class dog --category animal \
        --facts rex_facts.txt --profile "a golden retriever with a red collar" --data-root /data/uni_c_tokens_data
    python -m launch.new_concept --photos ~/photos/gran --name gran --class woman --facts gran.json \
        --data-root /data/mine --vlm http://127.0.0.1:8000/v1 --vlm-model Qwen2-VL-7B-Instruct --vlm-key-env ""
    python -m launch.new_concept --photos ./mug --name mymug --class mug --category object --data-root data/mine \
        --preset tiny --force

The photos are checked first (decodable, --min-side / --max-pixels / --max-aspect, near-duplicates by dHash, at
least --min-photos usable, and for a human a face MTCNN finds in --min-face-share of them); every refused file is
named with its reason. Nothing is written unless the photos, the text and the files read back by the dataset reader
are all valid, and an existing concept is replaced only with --force. The last --test-photos usable photos (natural
file-name order) are held out as test photos.

Facts (--facts): a text file with one fact per line, or a JSON list; each names the concept as <NAME> or <c> (or
starts with He/She/It/They). Each fact gets one reasoning prompt in concept/test/<c>/t2i_conditions.json. Without
facts the concept trains on visual tasks only (the printed train line sets data.text_task_ratio=0).

Text: offline templates by default (deterministic); with --vlm an OpenAI-compatible chat endpoint (the evaluation
judge's client: --vlm-model, --vlm-key-env, --vlm-timeout, --vlm-retries) writes the captions, conversations and
reasoning prompts from the photos; a reply that breaks its JSON schema is asked again --vlm-schema-retries times,
then the build stops with the reason. At the end the inject / train / evaluate command lines for the concept are
printed (--preset picks the configs). Exit code 2 on any refusal (one line on stderr).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

PRESETS = {"h100": ("configs/inject_h100.yaml", "configs/h100x8.yaml"),
           "tiny": ("configs/inject_tiny.yaml", "configs/tiny_cpu.yaml")}
"""--preset → (injection config, GRPO config) of the printed command lines."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.new_concept", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", required=True, help="folder of the concept's photos (png/jpg/jpeg/webp/bmp)")
    p.add_argument("--name", required=True, help="concept name: letters, digits, '_' and '-' (becomes <NAME>)")
    p.add_argument("--class", dest="class_word", required=True, help="class word, e.g. dog, mug, woman")
    p.add_argument("--category", choices=("human", "animal", "object"), default=None,
                   help="default: human when 'man' is in the class word (the released rule), else required")
    p.add_argument("--facts", default=None, help="facts file (one per line, or a JSON list) -> extra_info")
    p.add_argument("--profile", default=None, help="one-sentence profile -> info ('<c> is ...'); default: written "
                                                   "by --vlm, else '<NAME> is a CLASS.'")
    p.add_argument("--data-root", required=True, help="UniCTokens data root to add the concept to (created if new)")
    p.add_argument("--force", action="store_true", help="replace an existing concept of the same name")
    g = p.add_argument_group("photo checks")
    g.add_argument("--min-photos", type=int, default=5, help="usable photos needed (default 5)")
    g.add_argument("--test-photos", type=int, default=2, help="usable photos held out for evaluation (default 2)")
    g.add_argument("--min-side", type=int, default=256, help="shorter side in pixels (default 256)")
    g.add_argument("--max-pixels", type=int, default=50_000_000, help="pixels per photo (default 50e6)")
    g.add_argument("--max-aspect", type=float, default=3.0, help="longer/shorter side (default 3)")
    g.add_argument("--max-hash-distance", type=int, default=5,
                   help="dHash bits at or below which a photo is a near-duplicate (default 5 of 64)")
    g.add_argument("--min-face-share", type=float, default=0.5, help="human: share of photos with a face (0.5)")
    g.add_argument("--max-side", type=int, default=1024, help="longer side of the written photos (default 1024)")
    g.add_argument("--crop-size", type=int, default=512, help="side of the cropped/ squares (default 512)")
    v = p.add_argument_group("VLM text (an OpenAI-compatible chat-completions endpoint)")
    v.add_argument("--vlm", default=None, metavar="URL", help="API root, e.g. https://api.openai.com/v1")
    v.add_argument("--vlm-model", default="gpt-4o", help="model name (default gpt-4o)")
    v.add_argument("--vlm-key-env", default="OPENAI_API_KEY", help="variable holding the key ('' for none)")
    v.add_argument("--vlm-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    v.add_argument("--vlm-retries", type=int, default=3, help="retries of time-outs, 429 and 5xx (default 3)")
    v.add_argument("--vlm-schema-retries", type=int, default=2, help="re-asks of an invalid reply (default 2)")
    h = p.add_argument_group("hand-off")
    h.add_argument("--preset", choices=tuple(PRESETS), default="h100", help="configs of the printed commands")
    h.add_argument("--runs-root", default=None, help="run.output_root of the printed commands (default: the "
                                                     "config's, made absolute)")
    h.add_argument("--text-task-ratio", type=float, default=0.5, help="data.text_task_ratio the concept is checked "
                                                                      "against and trained with (default 0.5)")
    return p.parse_args(argv)


def handoff(root: Path, name: str, preset: str, runs_root: str | None, has_facts: bool,
            text_task_ratio: float) -> dict[str, str]:
    """The exact command lines that inject, train (on the injected rows) and evaluate the new concept, each with its
    own run name: {"inject", "train", "evaluate", "train_run"}. The train line is the one ``launch.inject`` itself
    prints when it finishes (:func:`launch.inject.grpo_command` on :func:`launch.inject.grpo_overrides`: checkpoint,
    last stage's epoch, token counts, model, data), plus ``data.text_task_ratio`` (0 without facts)."""
    from actors.inject.worker import checkpoint_dir
    from configs.inject import load_inject_config
    from configs.loader import load_yaml
    from configs.schema import resolve_config_path
    from launch.inject import grpo_command, grpo_overrides

    inject_cfg, train_cfg = PRESETS[preset]
    if runs_root is None:
        runs_root = load_yaml(resolve_config_path(train_cfg))["run"]["output_root"]
    runs = Path(runs_root).expanduser().resolve()
    inj = [f"data.root={root}", f"data.concepts=[{name}]", f"run.name=inject-{name}", f"run.output_root={runs}"]
    cfg = load_inject_config(inject_cfg, inj)
    last = cfg.inject.stages[-1]
    train_over = grpo_overrides(cfg, checkpoint_dir(cfg.run_dir, last), getattr(cfg.inject, last).epochs, [name])
    train_over.append(f"data.text_task_ratio={text_task_ratio if has_facts else 0}")
    train = grpo_command(cfg, train_over)
    argv = shlex.split(train)
    if argv[4] != train_cfg:
        raise RuntimeError(f"launch.inject.grpo_command chose {argv[4]}, not {train_cfg}")
    given = dict(a.split("=", 1) for a in argv[5:] if a.startswith(("run.name=", "run.output_root=")))
    if "run.name" not in given:   # the train run gets its own folder, never the config's shared default
        train += f" run.name=grpo-{name} run.output_root={shlex.quote(str(runs))}"
        given = {"run.name": f"grpo-{name}", "run.output_root": str(runs)}
    run_dir = Path(given.get("run.output_root", str(runs))) / given["run.name"]
    return {"inject": " ".join(["python -m launch.inject --config", inject_cfg, *(shlex.quote(o) for o in inj)]),
            "train": train, "train_run": str(run_dir),
            "evaluate": " ".join(["python -m launch.evaluate --checkpoint", shlex.quote(str(run_dir / "final")),
                                  "--out", shlex.quote(str(run_dir / "eval"))])}


def main(argv: list[str] | None = None) -> int:
    """CLI entrypoint; returns the process exit code (2 with one line on stderr when refused)."""
    args = parse_args(argv)
    from rl.data.concept_text import TextError, read_facts
    from rl.data.new_concept import ConceptError, NewConceptRequest, build_new_concept
    from rl.data.photos import PhotoLimits

    t0 = time.perf_counter()
    try:
        facts = read_facts(args.facts) if args.facts else []
        writer = None
        if args.vlm:
            from rl.data.concept_vlm import VLMTextWriter

            writer = VLMTextWriter(args.vlm, model=args.vlm_model, api_key_env=args.vlm_key_env or None,
                                   timeout_s=args.vlm_timeout, max_retries=args.vlm_retries,
                                   schema_retries=args.vlm_schema_retries)
        limits = PhotoLimits(min_photos=args.min_photos, test_photos=args.test_photos, min_side=args.min_side,
                             max_pixels=args.max_pixels, max_aspect=args.max_aspect,
                             max_hash_distance=args.max_hash_distance, min_face_share=args.min_face_share)
        req = NewConceptRequest(photos=Path(args.photos), name=args.name, class_word=args.class_word,
                                data_root=Path(args.data_root), category=args.category, profile=args.profile,
                                facts=facts, facts_source=f"--facts {args.facts}", force=args.force, limits=limits,
                                max_side=args.max_side, crop_size=args.crop_size,
                                text_task_ratio=args.text_task_ratio)
        result = build_new_concept(req, writer=writer)
    except (ConceptError, TextError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(n for _, n in result.files)
    print(f"files ({len(result.files)}, {total / 1e6:.2f} MB):")
    for rel, n in result.files:
        print(f"  {n:>10,d}  {rel}")
    cmds = handoff(result.root, result.name, args.preset, args.runs_root, result.facts > 0, args.text_task_ratio)
    print(f"done in {time.perf_counter() - t0:.1f}s. Next:")
    print(f"inject:   {cmds['inject']}")
    print(f"train:    {cmds['train']}")
    print(f"evaluate: {cmds['evaluate']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
