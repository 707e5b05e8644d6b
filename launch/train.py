r"""Train with UniCTask-GRPO: the embedded CPU default and the ``ray job submit`` entrypoint.

examples:
    python -m launch.train --config configs/tiny_cpu.yaml
    python -m launch.train --config configs/tiny_cpu.yaml run.steps=3 run.trackers=[tensorboard,mlflow]
    python -m launch.train --config configs/tiny_cpu.yaml --resume auto
    ray job submit --address http://127.0.0.1:8265 --runtime-env configs/runtime_env.yaml -- \
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
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")   # Serve's INFO lines go to its log files, not the job log

log = logging.getLogger("launch.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml",
                        help="YAML config (a path, or a name in configs/: tiny_cpu, h100x8, h100x8_colocated)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. run.steps=5 learner.lr=1e-4")
    return parser.parse_args(argv)


def prepare(cfg, training: bool = True):
    """Make paths absolute, create the sample dataset when the config asks for it, then (``training``) load and
    check the training dataset (every file, every image) before Ray starts or the run folder exists; returns the
    loaded dataset (None when not ``training``)."""
    from rl.data.reader import check_training_use, load_dataset
    from rl.data.sample import write_sample_dataset

    cfg.run.output_root = str(Path(cfg.run.output_root).expanduser().resolve())
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if not Path(cfg.data.root, "concepts_list.json").exists():
        if not cfg.data.make_sample_if_missing:
            raise FileNotFoundError(f"dataset not found at {cfg.data.root} (no concepts_list.json); set data.root "
                                    "or data.make_sample_if_missing=true")
        log.info("creating the sample dataset at %s", cfg.data.root)
        write_sample_dataset(cfg.data.root)
    if not training:
        return None
    dataset = load_dataset(cfg.data)
    check_training_use(dataset, cfg.data.text_task_ratio)
    if "fer" in cfg.serve.enabled:
        check_reference_faces(dataset, cfg.serve.fer.expert_config("fer"))
    log.info("dataset %s: %s", cfg.data.root, ", ".join(
        f"{n} ({c.info.category} by {c.info.category_source}; {len(c.train.references)} reference images, "
        f"{len(c.train.reasoning)} reasoning prompts from {c.train.reasoning_source})"
        for n, c in dataset.concepts.items()))
    return dataset


def check_reference_faces(dataset, fer_config) -> None:
    """DatasetError before Ray starts when a human concept has no reference photo with a face MTCNN finds under
    the FER expert's settings (the FER replica would refuse it only after the whole service is up); reference
    photos without a face are logged (FER skips them)."""
    from rewards.fer import faceless_images, make_detector
    from rl.data.files import DatasetError

    detector = None
    for name, c in dataset.concepts.items():
        if c.info.category != "human" or not c.train.references:
            continue
        detector = detector or make_detector(fer_config)
        refs = c.train.references
        missing = faceless_images([r.load() for r in refs], fer_config, detector)
        names = [Path(str(refs[i].path)).name for i in missing]
        if len(missing) == len(refs):
            raise DatasetError(f"{Path(str(refs[0].path)).parent}: no face found in any of the {len(refs)} reference "
                               f"photo(s) of human concept {name!r} ({', '.join(names)}; MTCNN, min_face_prob="
                               f"{fer_config.min_face_prob}); the FER reward needs one: add a photo showing the face "
                               f"(or list such photos in concept/train/train_images.json), or take 'fer' out of "
                               f"serve.enabled")
        if missing:
            log.warning("%s: %d of %d reference photos show no face MTCNN finds (%s); the FER reward skips them",
                        name, len(missing), len(refs), ", ".join(names))


def connect_ray(cfg, runtime_env: dict | None = None):
    """Start or join Ray for ``cfg`` (``ray.address`` null and no ``RAY_ADDRESS``: a new private loopback cluster,
    whatever Ray has recorded on the machine; ``auto`` / an address: join it), with the job-wide ``runtime_env``.
    Returns ``ray.init``'s context."""
    from actors.cluster.ray_env import start_local_ray

    rc = cfg.ray
    return start_local_ray(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=rc.include_dashboard,
                           dashboard_host=rc.dashboard_host, metrics_export_port=rc.metrics_export_port,
                           address=rc.address, runtime_env=runtime_env)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from actors.driver.trainer import Preempted, Trainer
    from actors.telemetry.prometheus import RUN_ENV, submission_id
    from configs.schema import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        dataset = prepare(cfg)
    except (ValueError, FileNotFoundError) as exc:   # ConfigError, DatasetError, missing paths: no traceback
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)   # one line, whatever the parser wrote
        return 2
    from actors.driver.checkpoint import CheckpointError, resume_candidates

    if args.resume and args.resume != "auto":   # a missing or damaged --resume PATH fails before Ray starts
        quiet = logging.getLogger("actors.driver.checkpoint")
        level = quiet.level
        quiet.setLevel(logging.ERROR)   # the Trainer repeats the check and logs its warnings
        try:
            resume_candidates(cfg.run_dir, args.resume)
        except CheckpointError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        finally:
            quiet.setLevel(level)
    os.environ[RUN_ENV] = cfg.run.name   # the run label of metrics recorded in this process and the job's actors
    connect_ray(cfg, runtime_env={"env_vars": {RUN_ENV: cfg.run.name,
                                               "RAY_SERVE_LOG_TO_STDERR": os.environ["RAY_SERVE_LOG_TO_STDERR"]}})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    import ray

    log.info("run %s: job %s%s, %d steps", cfg.run.name, ray.get_runtime_context().get_job_id(),
             f" (submission {submission_id()})" if submission_id() else "", cfg.run.steps)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, resume=args.resume, dataset=dataset)
    except CheckpointError as exc:   # a damaged / missing --resume checkpoint, named with the wrong file
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
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
    except CheckpointError as exc:   # no checkpoint could be loaded (each one tried is named in a warning above)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:   # success, error, SIGTERM or Ctrl-C: what the run started (reward applications included) goes
        trainer.shutdown()
    log.info("run finished in %.1fs; outputs in %s", time.perf_counter() - t0, cfg.run_dir)
    print(f"run folder: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
