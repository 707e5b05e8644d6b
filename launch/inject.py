r"""Concept injection (UniCTokens stages 1–3 / joint) as a job of the service.

examples:
    python -m launch.inject --config configs/inject_tiny.yaml
    python -m launch.inject --config configs/inject_tiny.yaml inject.stages=[joint] inject.joint.epochs=2
    ray job submit --address http://127.0.0.1:8265 --runtime-env configs/runtime_env.yaml -- \
        python -m launch.inject --config configs/inject_h100.yaml run.output_root=/shared/runs

Positional ``key.sub=value`` arguments override config fields. Output (``<run>``): ``concepts/<stage>/<concept>/
epoch_N_{embed,lm_head_weight,lm_head_bias}.pt`` (UniCTokens' format), ``metrics.jsonl`` + ``tensorboard/`` (loss
per stage per step; Ray metrics ``ray_inject_*``), ``config.yaml``, ``inject_summary.json`` and ``grpo_overrides.txt``:
the complete override set that makes the GRPO job train on the result (``model.concept_checkpoint_dir`` /
``concept_checkpoint_epoch`` / token counts / ``data.root`` / ``data.concepts``), printed at the end as a ready
``python -m launch.train`` command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("launch.inject")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m launch.inject", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/inject_tiny.yaml",
                        help="YAML config (a path, or a name in configs/: inject_tiny, inject_h100)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. inject.stages=[joint]")
    return parser.parse_args(argv)


def _progress(rep: dict) -> str:
    recs = rep["records"]
    c, s = rep["concept"], rep["stage"]
    keys = sorted({k.rsplit("/", 1)[1] for r in recs for k in r if k.startswith(f"{c}/{s}/")} - {"step_s"})
    means = {k: sum(r[f"{c}/{s}/{k}"] for r in recs if f"{c}/{s}/{k}" in r) /
             max(1, sum(f"{c}/{s}/{k}" in r for r in recs)) for k in keys}
    parts = " ".join(f"{k} {v:.4f}" for k, v in means.items())
    saved = f" saved {rep['saved']}" if rep["saved"] else ""
    return (f"[{c} {s}] epoch {rep['epoch']:>3d}/{rep['epochs']} steps {len(recs):>3d} {parts} "
            f"({rep['seconds']:.1f}s){saved}")


def run_injection(cfg) -> dict:
    """Run the job on the current Ray cluster (the caller started / joined it); returns the summary dict."""
    import ray
    import yaml

    from actors.driver.checkpoint import write_text_atomic
    from actors.inject.worker import RemoteInjectWorker, checkpoint_dir, deal
    from actors.telemetry.logger import MetricsLogger
    from configs.loader import to_dict
    from rl.data.reader import load_concept_dataset

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    concepts = list(cfg.data.concepts) or list(load_concept_dataset(cfg.data.root, config=cfg.data.reader).concepts)
    wc = cfg.worker
    workers = [RemoteInjectWorker.options(num_cpus=wc.num_cpus, num_gpus=wc.num_gpus).remote(cfg, share)
               for share in deal(concepts, wc.num_workers)]
    metrics = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, run_name=cfg.run.name, prefix="inject")
    summary: dict = {"run_dir": str(run_dir), "stages": list(cfg.inject.stages), "concepts": {}}
    t0 = time.perf_counter()
    try:
        for w, info in zip(workers, ray.get([w.info.remote() for w in workers], timeout=wc.epoch_timeout_s)):
            log.info("inject worker on %s: setup %.1fs, jobs %s", info["device"], info["setup_s"], info["jobs"])
        pending = {w.next_epoch.remote(): w for w in workers}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wc.epoch_timeout_s)
            if not done:
                raise TimeoutError(f"no inject worker finished an epoch within {wc.epoch_timeout_s:.0f}s")
            w = pending.pop(done[0])
            rep = ray.get(done[0])
            if rep is None:
                continue
            pending[w.next_epoch.remote()] = w
            for r in rep["records"]:
                metrics.log(r)
            if rep["epoch"] % max(cfg.run.log_every, 1) == 0 or rep["stage_done"]:
                print(_progress(rep), flush=True)
            _summarise(summary, rep)
    finally:
        metrics.close()
        for w in workers:
            ray.kill(w)
    last = cfg.inject.stages[-1]
    m = cfg.model
    epochs = {s["last_saved_epoch"] for c in summary["concepts"].values() for n, s in c.items() if n == last}
    summary["grpo_overrides"] = grpo_overrides(cfg, checkpoint_dir(run_dir, last), max(epochs) if epochs else None,
                                               concepts)
    summary["grpo_command"] = grpo_command(cfg, summary["grpo_overrides"])
    write_text_atomic(run_dir / "grpo_overrides.txt", "\n".join(summary["grpo_overrides"]) + "\n")
    summary["seconds"] = time.perf_counter() - t0
    write_text_atomic(run_dir / "inject_summary.json", json.dumps(summary, indent=2))
    return summary


def grpo_overrides(cfg, ckpt_dir, epoch: int | None, concepts: list[str]) -> list[str]:
    """The complete override set that makes the GRPO job train these concepts on the injected rows: the checkpoint,
    the token counts of the last stage, the model the rows belong to, and the dataset and concepts they were
    trained for (without ``data.concepts`` the GRPO job would train every concept of the dataset)."""
    last, m = cfg.inject.stages[-1], cfg.model
    out = [f"model.concept_checkpoint_dir={ckpt_dir}", f"model.concept_checkpoint_epoch={epoch}",
           f"model.num_understanding_tokens={m.num_understanding_tokens}",
           f"model.num_generation_tokens={m.num_generation_tokens if last != 'stage1' else 0}",
           f"model.num_stage3_tokens={m.num_stage3_tokens if last in ('stage3', 'joint') else 0}",
           f"data.root={cfg.data.root}", f"data.concepts=[{','.join(concepts)}]"]
    for key in ("preset", "random_init", "seed", "tokenizer_path", "showo_path", "magvit_path"):
        value = getattr(m, key, None)
        if value is not None:
            out.append(f"model.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def grpo_command(cfg, overrides: list[str]) -> str:
    """A ready ``python -m launch.train`` line for the result (tiny_cpu for the tiny preset, else h100x8) with its
    own run folder beside the injection's: ``run.output_root`` = the injection's, ``run.name`` = ``<name>-grpo``
    (without them the job would write into the config's default run folder, shared by every such line)."""
    import shlex

    base = "configs/tiny_cpu.yaml" if cfg.model.preset == "tiny" else "configs/h100x8.yaml"
    run = [f"run.output_root={Path(cfg.run_dir).parent}", f"run.name={cfg.run.name}-grpo"]
    return " ".join(["python -m launch.train --config", base, *(shlex.quote(o) for o in [*overrides, *run])])


def _summarise(summary: dict, rep: dict) -> None:
    c, s = rep["concept"], rep["stage"]
    st = summary["concepts"].setdefault(c, {}).setdefault(s, {"first_loss": None, "last_loss": None,
                                                              "checkpoint_dir": None, "last_saved_epoch": None})
    losses = [r[f"{c}/{s}/loss"] for r in rep["records"]]
    if losses and st["first_loss"] is None:
        st["first_loss"] = losses[0]
    if losses:
        st["last_loss"] = losses[-1]
    if rep["saved"]:
        st["checkpoint_dir"], st["last_saved_epoch"] = rep["saved"], rep["epoch"]
    st.update(rows=rep["rows"], init=rep["init"], **rep["extra"])


def main(argv: list[str] | None = None) -> int:
    """Entrypoint; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from actors.cluster.ray_env import start_ray_from_config
    from configs.inject import load_inject_config
    from launch.train import prepare

    cfg = load_inject_config(args.config, args.overrides)
    prepare(cfg, training=False)
    start_ray_from_config(cfg.ray)
    summary = run_injection(cfg)
    log.info("injection finished in %.1fs; outputs in %s", summary["seconds"], cfg.run_dir)
    print("GRPO overrides: " + " ".join(summary["grpo_overrides"]))
    print(f"GRPO job: {summary['grpo_command']}")
    print(f"run folder: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
