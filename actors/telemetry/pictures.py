"""Pictures in the run folder: a grid of generated images per concept, and the reward curves.

- ``images/step_<N>.png`` (every ``run.image_grid_every`` steps): one row per concept, its generated images, each
  captioned with its reward, advantage and prompt (concept token strings elided for readability).
- ``reward_curves.png``: ensemble reward (± one standard deviation over the step's samples) and each expert's mean
  reward against the step, read from ``metrics.jsonl``.

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


def save_image_grid(path: Path, samples: list, cell: int = 192, max_per_concept: int = 9,
                    title: str | None = None, caption_lines: int = 3) -> Path:
    """One row per concept: its generated images, each captioned with reward, advantage and prompt."""
    font = ImageFont.load_default()
    rows: dict[str, list] = {}
    for s in samples:
        rows.setdefault(s.concept, []).append(s)
    cols = max((min(len(v), max_per_concept) for v in rows.values()), default=1)
    label_w, title_h = 96, 18
    caption_h = (caption_lines + 1) * _LINE_H + 4
    width = label_w + cols * cell
    grid = Image.new("RGB", (width, title_h + max(1, len(rows)) * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), title or f"{len(samples)} samples", fill="black", font=font)
    chars = max(8, cell // _CHAR_W - 1)
    for r, (concept, items) in enumerate(sorted(rows.items())):
        y = title_h + r * (cell + caption_h)
        mean = float(np.mean([s.reward for s in items]))
        draw.text((4, y + 4), f"{concept}\nmean R {mean:.3f}\n{len(items)} samples", fill="black", font=font)
        for c, s in enumerate(sorted(items, key=lambda s: s.sample_index)[:max_per_concept]):
            x = label_w + c * cell
            img = Image.fromarray(np.asarray(s.image, dtype=np.uint8)).resize((cell, cell), Image.BILINEAR)
            grid.paste(img, (x, y))
            head = f"#{s.sample_index} R={s.reward:.3f} A={s.advantage:+.3f}"
            body = textwrap.wrap(display_prompt(s.prompt_text), chars)[:caption_lines]
            draw.text((x + 3, y + cell + 2), "\n".join([head] + body), fill="black", font=font, spacing=1)
        draw.line([(0, y + cell + caption_h - 1), (width, y + cell + caption_h - 1)], fill=(200, 200, 200))
    return _save_atomic(grid, path)


def save_reward_curves(path: Path, run_dir: Path) -> Path | None:
    """Plot reward (total ± std, and per expert) against step from the run's metrics.jsonl (None if empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from actors.telemetry.logger import read_metrics

    records = sorted(read_metrics(run_dir), key=lambda r: r.get("step", 0))
    if not records:
        return None
    steps = np.array([r["step"] for r in records])
    col = lambda key: np.array([r.get(key, np.nan) for r in records], dtype=np.float64)  # noqa: E731
    experts = sorted({k for r in records for k in r if k.startswith("reward/")} - {"reward/total", "reward/std"})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    total, std = col("reward/total"), col("reward/std")
    ax.plot(steps, total, color="black", linewidth=2.5, marker="o" if len(steps) < 30 else None,
            markersize=3, label="total")
    if np.isfinite(std).any():
        ax.fill_between(steps, total - std, total + std, color="black", alpha=0.12, label="total ± std")
    for key in experts:
        ax.plot(steps, col(key), linewidth=1.2, marker="." if len(steps) < 30 else None,
                label=key.split("/", 1)[1])
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(f"UniCTask-GRPO rewards ({Path(run_dir).name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        return _save_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)

