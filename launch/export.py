r"""Export a trained policy: Show-o safetensors (Show-o's keys and vocabulary) + UniCTokens concept rows + manifest.

examples:
    python -m launch.export --run runs/tiny-cpu --out exports/tiny-cpu
    python -m launch.export --run runs/tiny-cpu/checkpoints/step_000006 --out exports/step6 --merged

``--run``: a run folder (its final/, else its latest complete checkpoint), a run checkpoint folder, or a run's
final/ folder. The model structure (preset, tokenizer, token counts, concepts) comes from ``--config`` or else the
run's saved config.yaml; concept names and class words from its dataset. The export folder layout is described in
backbone/export.py; load it with ``backbone.export.load_exported_policy(dir)`` (or ``--checkpoint dir`` of
launch.evaluate / launch.generate). ``--merged`` also writes merged/pytorch_model.safetensors (concept rows in
place, post-surgery vocabulary).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("launch.export")


def export_run(run: str, out: str, config: str | None = None, overrides: list[str] | None = None,
               merged: bool = False, device: str = "cpu"):
    """Load the policy of ``run`` and export it to ``out``; returns the manifest path."""
    from backbone.export import export_policy, resolve_checkpoint
    from launch.evaluate import load_cli_config, load_cli_policy
    from launch.train import prepare

    kind, path = resolve_checkpoint(run)
    cfg = load_cli_config(config, list(overrides or []), run)
    if kind != "export":
        prepare(cfg, training=False)
    policy, dataset = load_cli_policy(cfg, run, device)
    words = {n: c.info.class_word for n, c in dataset.concepts.items()} if dataset is not None else None
    if kind == "export":
        from backbone.export import read_manifest

        words = {c["name"]: c.get("class_word") for c in read_manifest(path)["concepts"]}
    return export_policy(policy, out, cfg.model, class_words=words, merged=merged, source=f"{kind}:{path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder, run checkpoint folder, or a run's final/ folder")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--config", default=None, help="YAML config (default: the run's saved config.yaml)")
    p.add_argument("--merged", action="store_true", help="also write merged/pytorch_model.safetensors")
    p.add_argument("--device", default="cpu", help="device to load the policy on")
    p.add_argument("overrides", nargs="*", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    manifest = export_run(args.run, args.out, args.config, args.overrides, args.merged, args.device)
    print(f"exported to {manifest.parent} (manifest {manifest.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
