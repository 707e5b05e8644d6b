r"""Evaluate a policy on UnifyBench++ (the dataset's held-out test/ data): JSON + Markdown table + PNG grid.

examples:
    python -m launch.evaluate --checkpoint runs/tiny-cpu/final          # writes runs/tiny-cpu/eval/final/
    python -m launch.evaluate --config configs/tiny_cpu.yaml --checkpoint runs/tiny-cpu/final --out /tmp/ev
    python -m launch.evaluate --checkpoint runs/tiny-cpu/checkpoints/step_000006 --limit 2 eval.images_per_prompt=2

``--checkpoint``: an export folder (launch.export), a run's ``final/`` folder, a run checkpoint folder
(``<run>/checkpoints/step_N``), a run folder (its final/, else its latest checkpoint), a Show-o safetensors
file, or nothing (the config's model as is). Without ``--config`` a run checkpoint's saved config.yaml is used
(else configs/tiny_cpu.yaml). Positional ``key.sub=value`` overrides apply to the config, ``eval.*`` ones to the
evaluation settings (rl.eval.evaluate.EvalConfig).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("launch.evaluate")


def checkpoint_config_file(checkpoint: str | os.PathLike | None) -> Path | None:
    """The config.yaml saved with a run checkpoint that ``checkpoint`` points at (checkpoint folder, run folder, or
    the run's final/ folder), or None."""
    if checkpoint is None:
        return None
    p = Path(checkpoint).expanduser().resolve()
    if p.is_file():
        p = p.parent
    from backbone.export import latest_run_checkpoint

    for run in (p, p.parent):
        if (run / "config.yaml").is_file():
            return run / "config.yaml"
        latest = latest_run_checkpoint(run)
        if latest is not None and (latest / "config.yaml").is_file():
            return latest / "config.yaml"
    return None


def default_out_dir(checkpoint: str | None, cfg) -> Path:
    """Where results go without ``--out``: ``<run>/eval/<name>`` in the run folder the checkpoint belongs to (its
    ``final/``, a ``checkpoints/step_N`` folder, or the run folder itself: ``latest``), else in the config's run
    folder (``<name>`` = the checkpoint's file or folder name, or ``config`` without a checkpoint)."""
    if checkpoint is None:
        return Path(cfg.run_dir) / "eval" / "config"
    p = Path(checkpoint).expanduser().resolve()
    is_run = lambda d: (d / "config.yaml").is_file() or (d / "checkpoints").is_dir()  # noqa: E731
    if p.is_dir() and p.parent.name == "checkpoints":
        return p.parent.parent / "eval" / p.name
    if p.is_dir() and is_run(p):
        return p / "eval" / "latest"
    if p.is_dir() and is_run(p.parent):
        return p.parent / "eval" / p.name
    return Path(cfg.run_dir) / "eval" / p.stem


def load_cli_config(config: str | None, overrides: list[str], checkpoint: str | None = None):
    """TrainConfig from ``config`` (else the checkpoint's saved config, else tiny_cpu) + overrides."""
    from configs.loader import apply_overrides, from_dict, load_yaml
    from configs.schema import TrainConfig, resolve_config_path

    if config is not None:
        data = load_yaml(resolve_config_path(config))
    else:
        saved = checkpoint_config_file(checkpoint)
        data = load_yaml(saved) if saved else load_yaml(resolve_config_path("tiny_cpu"))
        if saved:
            log.info("using the run's saved config %s", saved)
    data = apply_overrides(data, list(overrides))
    return from_dict(TrainConfig, data)


def load_cli_policy(cfg, checkpoint: str | None, device: str = "cpu", dataset=None):
    """(policy, dataset or None): the checkpoint's policy; concept names / class words come from the dataset unless
    the checkpoint is a self-describing export (then ``cfg.model`` is set to the export's model config)."""
    from backbone.build import ConceptSpec
    from backbone.export import load_policy, resolve_checkpoint
    from rl.data.reader import load_dataset

    is_export = checkpoint is not None and resolve_checkpoint(checkpoint)[0] == "export"
    if is_export:  # token counts etc. as exported (prompts split the tokens by these counts)
        from backbone.export import export_model_config

        cfg.model = export_model_config(checkpoint)[0]
    if dataset is None and not is_export:
        dataset = load_dataset(cfg.data)
    specs = [] if dataset is None else [ConceptSpec(n, c.info.class_word) for n, c in sorted(dataset.concepts.items())]
    return load_policy(checkpoint, cfg.model, specs, device=device), dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (path or name in configs/)")
    p.add_argument("--checkpoint", default=None, help="export / final / run checkpoint / run folder (none = config)")
    p.add_argument("--out", default=None, help="output folder (results.json, results.md, grid.png, images/); "
                   "default: <run>/eval/<checkpoint name> of the run the checkpoint belongs to, else of the config")
    p.add_argument("--limit", type=int, default=None, help="cap on every per-concept list (questions, prompts)")
    p.add_argument("--concepts", default=None, help="comma-separated concepts (default: all)")
    p.add_argument("--device", default="cpu", help="torch device for the policy and the scorers")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. sampler.timesteps=12 eval.judge=myjudge")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from launch.train import prepare
    from rl.data.reader import load_dataset
    from rl.eval.evaluate import evaluate_policy, write_eval_outputs

    cfg = load_cli_config(args.config, args.overrides, args.checkpoint)
    prepare(cfg, training=False)
    # the policy's concepts are the run's (cfg.data.concepts); --concepts only selects which are evaluated
    dataset = load_dataset(cfg.data, include_test=True)
    policy, _ = load_cli_policy(cfg, args.checkpoint, args.device, dataset=dataset)
    wanted = args.concepts.split(",") if args.concepts else list(dataset.concepts)
    unknown = sorted(set(wanted) - set(dataset.concepts))
    if unknown:
        raise SystemExit(f"--concepts: {unknown} not in the dataset ({sorted(dataset.concepts)})")
    names = [n for n in wanted if n in policy.concepts]
    missing = sorted(set(wanted) - set(names))
    if missing:
        log.warning("the policy has no tokens for %s: not evaluated", missing)
    if not names:
        raise SystemExit(f"no concept of the dataset ({sorted(dataset.concepts)}) is in the policy "
                         f"({sorted(policy.concepts)})")
    result = evaluate_policy(cfg, policy, dataset, limit=args.limit, concepts=names)
    result["checkpoint"] = str(args.checkpoint) if args.checkpoint else None
    paths = write_eval_outputs(result, args.out or default_out_dir(args.checkpoint, cfg))
    print(Path(paths["markdown"]).read_text())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
