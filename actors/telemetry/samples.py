"""Rollout records: every sample of a step, as the policy was trained on it, in ``<run>/samples/``.

Every ``run.samples_every`` steps (default 1) the driver writes

- ``samples/step_<N>.jsonl``: one JSON object per sample (:data:`COLUMNS`), N counted from 1 as in the job log and
  the image grids (``metrics.jsonl``'s ``step`` is N - 1). ``pandas.read_json(path, lines=True)`` opens it;
- ``samples/step_<N>/p<prompt>_s<sample>.png``: the kept image of each sample (the ``image`` column, relative to
  ``samples/``).

Every file is written to a temporary name in the same folder and renamed, images first and the JSONL last, so a run
killed mid-write never leaves a half file and a step's JSONL only names images that exist. Writing step N removes
the records of later steps left by an earlier attempt (a resumed or rewound run re-does them).

Readers (:func:`list_steps`, :func:`read_samples`) and the two text renderings (:func:`format_table` for the
terminal, :func:`markdown_table` for TensorBoard) use the standard library only; writing needs numpy and Pillow.
"""
from __future__ import annotations

import json
import math
import os
import re
import textwrap
from pathlib import Path

SAMPLES_DIR = "samples"
"""Folder of the records inside the run folder."""

TASK_NAMES = {"visual": "visual-instruct", "text": "text-only"}
"""``RolloutSample.task_kind`` → the ``task`` column."""

COLUMNS: dict[str, str] = {
    "step": "GRPO step, counted from 1 as in the job log (metrics.jsonl's step + 1).",
    "prompt_index": "The prompt (group) within the step.",
    "sample_index": "The sample within its group (0..G-1).",
    "concept": "Concept name.",
    "category": "human | animal | object.",
    "task": "Understanding task kind: visual-instruct (photo + question) or text-only (extra_info + reasoning prompt).",
    "input_image": "File name of the task's input image (a training photo, or the black placeholder).",
    "question": "The question (visual) or the reasoning prompt (text) as the data writes it.",
    "reference": "The reference answer (visual) or the target extra_info item (text).",
    "answer": "The policy's answer, the IR (before cleaning).",
    "answer_tokens": "Number of answer tokens sampled.",
    "compound_prompt": "The compound prompt CP the image was generated from.",
    "prompt_cut": "True when the IR was cut to fit Show-o's text block.",
    "reward_text": "The text the screen and the reward experts scored the image against.",
    "reward_<expert>": "One column per reward expert (tier, ber, der, fer, ...); null where it did not score.",
    "reward": "Ensemble reward R.",
    "advantage": "Dr.GRPO advantage R - mean(R_group).",
    "dsog": "kept (first attempt passed) | redrawn (passed after redraws) | forced (kept at the cap below the "
            "threshold) | unscreened (DSOG off).",
    "attempts": "DSOG attempts drawn for the sample.",
    "screen_score": "Screen score of the kept attempt (null when DSOG is off).",
    "attempt_scores": "Screen score of every attempt, in order.",
    "threshold": "DSOG threshold the step screened with (null while uncalibrated or DSOG off).",
    "image": "The kept image, a PNG path relative to samples/.",
}
"""Columns of a ``step_<N>.jsonl`` row, in order (``reward_<expert>`` stands for one column per expert)."""

_STEP_FILE = re.compile(r"^step_(\d{6,})\.jsonl$")


def samples_dir(run_dir: Path | str) -> Path:
    """``<run>/samples``."""
    return Path(run_dir) / SAMPLES_DIR


def step_file(run_dir: Path | str, step: int) -> Path:
    """The JSONL of step ``step`` (counted from 1)."""
    return samples_dir(run_dir) / f"step_{int(step):06d}.jsonl"


def due(step: int, every: int) -> bool:
    """Whether the 0-based ``step`` is recorded at cadence ``every`` (0 = never): steps every, 2·every, ... from 1."""
    return bool(every) and (int(step) + 1) % int(every) == 0


def dsog_outcome(sample) -> str:
    """``kept`` / ``redrawn`` / ``forced`` / ``unscreened`` for a sample (see :data:`COLUMNS`)."""
    if not getattr(sample, "attempt_scores", None) and not _finite(sample.screen_score):
        return "unscreened"
    if getattr(sample, "forced", False):
        return "forced"
    return "kept" if int(sample.attempts) <= 1 else "redrawn"


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _num(v):
    """A JSON-safe number: non-finite values become null (JSON has no NaN)."""
    return float(v) if _finite(v) else None


def image_name(step: int, sample) -> str:
    """The PNG of a sample, relative to ``samples/``."""
    return f"step_{int(step):06d}/p{int(sample.prompt_index):03d}_s{int(sample.sample_index):02d}.png"


def sample_record(sample, step: int, experts: list[str] | tuple = (), threshold: float | None = None) -> dict:
    """The JSONL row of one :class:`rl.grpo.batch.RolloutSample` (columns :data:`COLUMNS`); ``step`` counts from 1,
    ``experts`` fixes the ``reward_<expert>`` columns (experts the sample was not scored by are null)."""
    names = list(experts) + sorted(set(sample.rewards) - set(experts))
    row = {"step": int(step), "prompt_index": int(sample.prompt_index), "sample_index": int(sample.sample_index),
           "concept": sample.concept, "category": sample.category,
           "task": TASK_NAMES.get(sample.task_kind, sample.task_kind), "input_image": sample.input_image,
           "question": sample.question, "reference": sample.reference, "answer": sample.answer_text,
           "answer_tokens": int(len(sample.answer_ids)), "compound_prompt": sample.prompt_text,
           "prompt_cut": bool(sample.prompt_cut), "reward_text": sample.reward_text}
    for name in names:
        row[f"reward_{name}"] = _num(sample.rewards.get(name))
    row.update(reward=_num(sample.reward), advantage=_num(sample.advantage), dsog=dsog_outcome(sample),
               attempts=int(sample.attempts), screen_score=_num(sample.screen_score),
               attempt_scores=[_num(x) for x in sample.attempt_scores], threshold=_num(threshold),
               image=image_name(step, sample))
    return row


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _png(image) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def remove_after(run_dir: Path | str, step: int) -> list[int]:
    """Delete the records (JSONL, images, stray temporary files) of steps > ``step``; returns the steps removed."""
    import shutil

    folder = samples_dir(run_dir)
    gone = [s for s in list_steps(run_dir) if s > step]
    for s in gone:
        step_file(run_dir, s).unlink(missing_ok=True)
        shutil.rmtree(folder / f"step_{s:06d}", ignore_errors=True)
    for tmp in folder.glob(".*.tmp"):   # left by a run killed mid-write
        tmp.unlink(missing_ok=True)
    return gone


def write_samples(run_dir: Path | str, step: int, samples: list, experts: list[str] | tuple = (),
                  threshold: float | None = None) -> tuple[Path, list[dict]]:
    """Record the samples of step ``step`` (counted from 1): their PNGs, then ``step_<N>.jsonl``; records of later
    steps (an earlier attempt's, before a resume or rewind) are removed. Returns the JSONL's path and its rows."""
    step = int(step)
    folder = samples_dir(run_dir)
    (folder / f"step_{step:06d}").mkdir(parents=True, exist_ok=True)
    remove_after(run_dir, step)
    order = sorted(samples, key=lambda s: (s.prompt_index, s.sample_index))
    rows = []
    for s in order:
        row = sample_record(s, step, experts, threshold)
        _write_atomic(folder / row["image"], _png(s.image))
        rows.append(row)
    path = step_file(run_dir, step)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _write_atomic(path, text.encode("utf-8", errors="replace"))   # a lone surrogate becomes "?", never an error
    return path, rows


# -- reading --------------------------------------------------------------------------------------------------
def list_steps(run_dir: Path | str) -> list[int]:
    """The recorded steps (counted from 1), in increasing order."""
    folder = samples_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (_STEP_FILE.match(p.name) for p in folder.iterdir()) if m)


def read_samples(run_dir: Path | str, step: int | None = None) -> tuple[int, list[dict]]:
    """(step, rows) of a recorded step (default: the last). Raises FileNotFoundError with a one-line message when
    the run folder, its records or that step are missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder {run}")
    steps = list_steps(run)
    if not steps:
        raise FileNotFoundError(f"{run} has no sample records ({samples_dir(run)}/step_*.jsonl; written every "
                                f"run.samples_every steps)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        shown = ", ".join(map(str, steps[:10])) + (" ..." if len(steps) > 10 else "")
        raise FileNotFoundError(f"{run}: step {step} has no sample records (recorded steps: {shown})")
    rows = [json.loads(line) for line in step_file(run, step).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return step, rows


def expert_columns(rows: list[dict]) -> list[str]:
    """The ``reward_<expert>`` columns of ``rows``, in first-seen order."""
    out: list[str] = []
    for r in rows:
        out += [k for k in r if k.startswith("reward_") and k != "reward_text" and k not in out]
    return out


# -- text renderings --------------------------------------------------------------------------------------------
def _cell(v, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return str(v)


_TOKENS = re.compile(r"(?:<[\w-]*token_\d+>\s*){2,}")   # runs of concept-token strings (pictures.display_prompt)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")   # what a terminal or HTML would not show as text


def display_text(text: str) -> str:
    """A text for reading: each run of two or more concept-token strings shown as ``‹N tokens›``, whitespace
    collapsed, control characters (a random-init policy samples them) shown as ``�``."""
    def repl(m: re.Match) -> str:
        return f"‹{len(re.findall(r'<[^>]+>', m.group(0)))} tokens› "
    return _CONTROL.sub("\ufffd", re.sub(r"\s+", " ", _TOKENS.sub(repl, str(text))).strip())


def _clip(text: str, width: int) -> str:
    text = _CONTROL.sub("\ufffd", re.sub(r"\s+", " ", str(text)).strip())
    return text if len(text) <= width else text[:max(width - 3, 0)] + "..."


def format_table(rows: list[dict], width: int = 160) -> str:
    """The samples as terminal text fitted to ``width`` columns: one line per group (concept, task, question,
    reference), then a table of ids, concept, task, each expert's reward, R, advantage, DSOG outcome, attempts, kept
    screen score and the answer (IR) cut to the room left (``format_details`` has every text in full)."""
    groups = {}
    for r in rows:
        groups.setdefault(r["prompt_index"], r)
    lines = [_clip(f"group {p}: {r['concept']}, {r['task']}: {display_text(r['question'])} -> reference: "
                   f"{display_text(r['reference'])}", width) for p, r in groups.items()]
    experts = expert_columns(rows)
    fixed = [("p/s", lambda r: f"{r['prompt_index']}/{r['sample_index']}"), ("concept", lambda r: r["concept"]),
             ("task", lambda r: "visual" if r["task"].startswith("visual") else "text")]
    fixed += [(e[len("reward_"):], (lambda e: lambda r: _cell(r.get(e)))(e)) for e in experts]
    fixed += [("R", lambda r: _cell(r["reward"], 4)), ("A", lambda r: _cell(r["advantage"], 4, signed=True)),
              ("dsog", lambda r: r["dsog"]), ("att", lambda r: str(r["attempts"])),
              ("screen", lambda r: _cell(r["screen_score"]))]
    cells = [[fn(r) for _, fn in fixed] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(fixed)]
    room = max(width - sum(widths) - 2 * len(widths), 12)
    head = "  ".join(h.ljust(w) for (h, _), w in zip(fixed, widths)) + "  answer (IR)"
    lines += [head, "-" * min(len(head) - len("answer (IR)") + room, width)]
    for r, c in zip(rows, cells):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths)) + "  " + _clip(display_text(r["answer"]), room))
    return "\n".join(line.rstrip() for line in lines)


def format_details(rows: list[dict], width: int = 100) -> str:
    """Every sample's texts in full (question, reference, answer, compound prompt, reward text), one block each."""
    out = []
    for r in rows:
        rewards = " ".join(f"{e[len('reward_'):]}={_cell(r[e])}" for e in expert_columns([r]))
        out.append(f"== sample {r['prompt_index']}/{r['sample_index']}  {r['concept']} ({r['category']})  {r['task']}"
                   f"  R={_cell(r['reward'], 4)} A={_cell(r['advantage'], 4, signed=True)}  {rewards}")
        out.append(f"   dsog: {r['dsog']}, {r['attempts']} attempt(s), scores "
                   f"{', '.join(_cell(x) for x in r['attempt_scores']) or '-'}, threshold {_cell(r['threshold'])}"
                   f"; image samples/{r['image']}")
        for key in ("question", "reference", "answer", "compound_prompt", "reward_text"):
            text = textwrap.fill(_clip(r[key], 10**6) or "-", width,
                                 initial_indent=f"   {key}: ", subsequent_indent=" " * 6)
            out.append(text)
    return "\n".join(out)


def markdown_table(rows: list[dict], max_text: int = 300) -> str:
    """The samples as a Markdown table (TensorBoard's text plugin renders it)."""
    def esc(v, n=max_text):
        return _clip(_cell(v), n).replace("|", "\\|")

    experts = expert_columns(rows)
    head = ["sample", "concept", "task", "question", "answer", "compound prompt", "reward text"] + \
        [e[len("reward_"):] for e in experts] + ["R", "A", "DSOG", "image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['prompt_index']}/{r['sample_index']}", r["concept"], r["task"], r["question"], r["answer"],
                 r["compound_prompt"], r["reward_text"]] + [r[e] for e in experts] + \
            [_cell(r["reward"], 4), _cell(r["advantage"], 4, signed=True), f"{r['dsog']} ({r['attempts']})",
             r["image"]]
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(lines)
