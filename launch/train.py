"""Train with UniCTask-GRPO: the embedded CPU default and the ``ray job submit`` entrypoint.

    python -m launch.train --config configs/tiny_cpu.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m launch.train --config configs/h100x8.yaml run.output_root=/shared/runs

Positional ``key.sub=value`` arguments override config fields. ``--resume auto`` continues from the run's
latest complete checkpoint (if any); ``--resume PATH`` from a given checkpoint folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("launch.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml",
                        help="YAML config (a path, or a name in configs/: tiny_cpu, h100x8, h100x8_colocated)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. run.steps=5 learner.lr=1e-4")
    return parser.parse_args(argv)


def prepare(cfg) -> None:
    """Make paths absolute and create the sample dataset when the config asks for it."""
    from rl.sample_data import write_sample_dataset

    cfg.run.output_root = str(Path(cfg.run.output_root).expanduser().resolve())
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if not Path(cfg.data.root, "concepts_list.json").exists():
        if not cfg.data.make_sample_if_missing:
            raise FileNotFoundError(f"dataset not found at {cfg.data.root} (no concepts_list.json); set data.root "
                                    "or data.make_sample_if_missing=true")
        log.info("creating the sample dataset at %s", cfg.data.root)
        write_sample_dataset(cfg.data.root)


def connect_ray(cfg):
    """Start or join Ray for ``cfg`` (``ray.address`` null and no ``RAY_ADDRESS``: a new private loopback cluster,
    whatever Ray has recorded on the machine; ``auto`` / an address: join it). Returns ``ray.init``'s context."""
    from actors.ray_env import start_ray_from_config

    return start_ray_from_config(cfg.ray)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from actors.controller import Preempted, Trainer
    from configs.schema import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        prepare(cfg)
    except (ValueError, FileNotFoundError) as exc:   # ConfigError, DatasetError, missing paths: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from actors.checkpoint import CheckpointError

    connect_ray(cfg)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, resume=args.resume)
    except CheckpointError as exc:   # a damaged / missing --resume checkpoint, named with the wrong file
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def stop_during_setup(signum, frame):   # Trainer.run installs a graceful handler once steps run
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop_during_setup)
    try:
        trainer.setup()
        trainer.run()
    except Preempted as exc:
        log.warning("%s", exc)
        return 143
    finally:   # success, error, SIGTERM or Ctrl-C: what the run started (reward applications included) goes
        trainer.shutdown()
    log.info("run finished in %.1fs; outputs in %s", time.perf_counter() - t0, cfg.run_dir)
    print(f"run folder: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
