r"""Generate images with a (trained) policy, using the concept's tokens exactly as training does.

examples:
    python -m launch.generate --checkpoint runs/tiny-cpu/final --prompt "A photo of <c> on the beach." \
        --concept chelsea --num 4 --seed 0 --out gen_out

``<c>`` (or the concept's own token, e.g. ``<chelsea>``) in the prompt names the concept; its first mention is
expanded to ``"<token_0..23> <chelsea>"`` (rl.grpo.tasks.expand_concept, as the T2I prompts of training). Without
``--concept`` the concept is the one whose token the prompt mentions, or the policy's only concept. A prompt with
no concept mention is generated as is. Image i draws only from ``sample_seed(seed, 0, 0, i, 0, "generate")``, so
the same checkpoint, prompt and seed give bit-identical images in any batch size. Writes ``000.png`` …,
``grid.png``, ``codes.npy`` (int64 [num, N] MAGVIT code ids) and ``generation.json``.
Checkpoint kinds and config resolution as launch.evaluate; ``key.sub=value`` overrides (e.g. sampler.timesteps=12).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("launch.generate")


def resolve_prompt(prompt: str, concepts: dict, concept: str | None = None) -> tuple[str | None, str]:
    """(concept name or None, the prompt with "<c>" replaced by the concept's token)."""
    if concept is not None and concept not in concepts:
        raise ValueError(f"--concept {concept!r}: the policy has {sorted(concepts)}")
    if concept is None:
        named = [n for n, ct in concepts.items() if ct.concept_str in prompt]
        if len(named) > 1:
            raise ValueError(f"the prompt mentions several concepts {named}; pass --concept")
        if named:
            concept = named[0]
        elif "<c>" in prompt:
            if len(concepts) != 1:
                raise ValueError(f"the prompt uses <c> but the policy has {len(concepts)} concepts "
                                 f"({sorted(concepts)}); pass --concept")
            concept = next(iter(concepts))
    if concept is None:
        return None, prompt
    token = concepts[concept].concept_str
    prompt = prompt.replace("<c>", token)
    if token not in prompt:
        raise ValueError(f"the prompt does not mention <c> or {token}: {prompt!r}")
    return concept, prompt


def generate_to_dir(policy, prompt: str, out_dir: str | os.PathLike, concept: str | None = None, num: int = 1,
                    seed: int = 0, sampler_cfg=None, model_cfg=None, max_text_len: int = 128,
                    batch_size: int = 8) -> dict:
    """Generate ``num`` images of ``prompt`` into ``out_dir``; returns the generation record (also written as
    generation.json) with ``codes`` (np.int64 [num, N]) and ``images`` (uint8) added."""
    from backbone.config import SamplerConfig
    from rl.eval.evaluate import generate_images, save_grid
    from rl.grpo.seeding import sample_seed
    from rl.grpo.tasks import ConceptPromptTokens, expand_concept

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    concept, prompt = resolve_prompt(prompt, policy.concepts, concept)
    text = prompt
    if concept is not None:
        nu = model_cfg.num_understanding_tokens if model_cfg is not None else 16
        ng = model_cfg.num_generation_tokens if model_cfg is not None else 8
        text = expand_concept(prompt, ConceptPromptTokens.from_concept_tokens(policy.concepts[concept], nu, ng))
    seeds = [sample_seed(seed, 0, 0, i, 0, "generate") for i in range(num)]
    codes, images = generate_images(policy, [text] * num, seeds, sampler_cfg or SamplerConfig(), max_text_len,
                                    batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    files = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(out / f"{i:03d}.png")
        files.append(f"{i:03d}.png")
    np.save(out / "codes.npy", codes.numpy().astype(np.int64))
    save_grid(out / "grid.png", [(concept or "", [(im, str(i)) for i, im in enumerate(images)])])
    record = {"prompt": prompt, "showo_prompt": text, "concept": concept, "num": num, "seed": seed, "seeds": seeds,
              "files": files, "codes": "codes.npy"}
    (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "codes": codes.numpy().astype(np.int64), "images": images}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="export / final / run checkpoint / run folder (none = config)")
    p.add_argument("--config", default=None, help="YAML config (default: the run's saved config, else tiny_cpu)")
    p.add_argument("--prompt", required=True, help='e.g. "A photo of <c> on the beach."')
    p.add_argument("--concept", default=None, help="concept name (default: from the prompt)")
    p.add_argument("--num", type=int, default=4, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed (image i uses sample_seed(seed, 0, 0, i, 0, 'generate'))")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (results do not depend on it)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. sampler.timesteps=12")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from launch.evaluate import load_cli_config, load_cli_policy
    from launch.train import prepare

    cfg = load_cli_config(args.config, args.overrides, args.checkpoint)
    from backbone.export import resolve_checkpoint

    if args.checkpoint is None or resolve_checkpoint(args.checkpoint)[0] != "export":
        prepare(cfg, training=False)
    policy, _ = load_cli_policy(cfg, args.checkpoint, args.device)
    rec = generate_to_dir(policy, args.prompt, args.out, concept=args.concept, num=args.num, seed=args.seed,
                          sampler_cfg=cfg.sampler, model_cfg=cfg.model, max_text_len=cfg.rollout.max_text_len,
                          batch_size=args.batch_size)
    print(f"{len(rec['files'])} images of {rec['showo_prompt']!r} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
