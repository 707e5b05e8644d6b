"""Pictures in the run folder: a grid of generated images per concept, and the reward curves.

- ``images/step_<N>.png`` (every ``run.image_grid_every`` steps): one row per concept, its generated images, each
  captioned with its reward, advantage and the whole prompt, wrapped to the cell width (concept token strings
  elided for readability); the caption band grows to fit the longest caption, nothing is cut.
- ``reward_curves.png``: ensemble reward (± one standard deviation over the step's samples) and each expert's mean
  reward against the step N the log and the grids show (steps counted from 1: ``metrics.jsonl``'s ``step`` + 1),
  read from ``metrics.jsonl``; the legend lists only the experts that scored in the run (FER without a human
  concept never does).

Both are written to a temporary file and renamed, so a reader never sees a half-written PNG.
"""
from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

_CONCEPT_TOKENS = re.compile(r"(?:<[\w-]*token_\d+>\s*)+")
_CHAR_W, _LINE_H = 6, 11   # PIL's default bitmap font


def display_prompt(text: str) -> str:
    """A prompt for captions: its learnable concept-token strings (``<token_3>``, ``<cat_token_7>``) elided and
    characters PIL's default bitmap font cannot draw replaced by '?'."""
    text = re.sub(r"\s+", " ", _CONCEPT_TOKENS.sub(".. ", text)).strip()
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _save_atomic(img_or_fig, path: Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    if isinstance(img_or_fig, Image.Image):
        img_or_fig.save(tmp)
    else:
        img_or_fig.savefig(tmp, **kwargs)
    tmp.replace(path)
    return path


def caption_lines(sample, chars: int) -> list[str]:
    """A grid caption, wrapped to ``chars`` columns and never cut: ``#i R=.. A=..`` then the whole prompt."""
    head = f"#{sample.sample_index} R={sample.reward:.3f} A={sample.advantage:+.3f}"
    return textwrap.wrap(head, chars) + textwrap.wrap(display_prompt(sample.prompt_text), chars)


def save_image_grid(path: Path, samples: list, cell: int = 192, max_per_concept: int = 9,
                    title: str | None = None, caption_lines_min: int = 3) -> Path:
    """One row per concept: its generated images, each captioned with reward, advantage and the whole prompt
    (wrapped; the caption band is as tall as the longest caption, at least ``caption_lines_min`` + 1 lines)."""
    font = ImageFont.load_default()
    rows: dict[str, list] = {}
    for s in samples:
        rows.setdefault(s.concept, []).append(s)
    rows = {c: sorted(items, key=lambda s: s.sample_index) for c, items in sorted(rows.items())}
    cols = max((min(len(v), max_per_concept) for v in rows.values()), default=1)
    label_w, title_h = 96, 18
    chars = max(8, cell // _CHAR_W - 1)
    captions = {id(s): caption_lines(s, chars) for items in rows.values() for s in items[:max_per_concept]}
    lines = max([caption_lines_min + 1, *(len(c) for c in captions.values())])
    caption_h = lines * _LINE_H + 4
    width = max(label_w + cols * cell, 8 + _CHAR_W * len(title or ""))
    grid = Image.new("RGB", (width, title_h + max(1, len(rows)) * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), title or f"{len(samples)} samples", fill="black", font=font)
    for r, (concept, items) in enumerate(rows.items()):
        y = title_h + r * (cell + caption_h)
        mean = float(np.mean([s.reward for s in items]))
        label = "\n".join(textwrap.wrap(concept, label_w // _CHAR_W - 1) + [f"mean R {mean:.3f}",
                                                                            f"{len(items)} samples"])
        draw.text((4, y + 4), label, fill="black", font=font)
        for c, s in enumerate(items[:max_per_concept]):
            x = label_w + c * cell
            img = Image.fromarray(np.asarray(s.image, dtype=np.uint8)).resize((cell, cell), Image.BILINEAR)
            grid.paste(img, (x, y))
            draw.text((x + 3, y + cell + 2), "\n".join(captions[id(s)]), fill="black", font=font, spacing=1)
        draw.line([(0, y + cell + caption_h - 1), (width, y + cell + caption_h - 1)], fill=(200, 200, 200))
    return _save_atomic(grid, path)


def scored_experts(records: list[dict]) -> list[str]:
    """``reward/<expert>`` keys with at least one finite value in the run (the legend of the reward curves)."""
    keys = sorted({k for r in records for k in r if k.startswith("reward/")} - {"reward/total", "reward/std"})
    return [k for k in keys if any(isinstance(r.get(k), (int, float)) and np.isfinite(r[k]) for r in records)]


def reward_curves_figure(records: list[dict], title: str):
    """The matplotlib figure of :func:`save_reward_curves` for ``metrics.jsonl`` records (the caller closes it):
    x = step N (``step`` + 1), total ± std, one line per expert that scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = sorted(records, key=lambda r: r.get("step", 0))
    steps = np.array([r["step"] for r in records]) + 1   # step N of the log and the grids (1-based)
    col = lambda key: np.array([r.get(key, np.nan) for r in records], dtype=np.float64)  # noqa: E731
    fig, ax = plt.subplots(figsize=(8, 4.5))
    total, std = col("reward/total"), col("reward/std")
    ax.plot(steps, total, color="black", linewidth=2.5, marker="o" if len(steps) < 30 else None,
            markersize=3, label="total")
    if np.isfinite(std).any():
        ax.fill_between(steps, total - std, total + std, color="black", alpha=0.12, label="total ± std")
    for key in scored_experts(records):
        ax.plot(steps, col(key), linewidth=1.2, marker="." if len(steps) < 30 else None,
                label=key.split("/", 1)[1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (N as in the log, from 1)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def save_reward_curves(path: Path, run_dir: Path) -> Path | None:
    """Plot reward (total ± std, and per expert that scored) against step N = ``metrics.jsonl`` step + 1, from the
    run's metrics.jsonl (None if empty)."""
    import matplotlib.pyplot as plt

    from actors.telemetry.logger import read_metrics

    records = list(read_metrics(run_dir))
    if not records:
        return None
    fig = reward_curves_figure(records, f"UniCTask-GRPO rewards ({Path(run_dir).name})")
    try:
        return _save_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)
