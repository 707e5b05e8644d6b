"""Pictures in the run folder: a grid of generated images per concept, and the reward curves."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


def save_image_grid(path: Path, samples: list, cell: int = 192, max_per_concept: int = 9) -> Path:
    """One row per concept: its generated images, each captioned with its reward and the start of its prompt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {}
    for s in samples:
        rows.setdefault(s.concept, []).append(s)
    cols = max((min(len(v), max_per_concept) for v in rows.values()), default=1)
    caption = 34
    grid = Image.new("RGB", (cols * cell, max(1, len(rows)) * (cell + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (concept, items) in enumerate(sorted(rows.items())):
        for c, s in enumerate(items[:max_per_concept]):
            img = Image.fromarray(np.asarray(s.image, dtype=np.uint8)).resize((cell, cell), Image.NEAREST)
            x, y = c * cell, r * (cell + caption)
            grid.paste(img, (x, y))
            text = f"{concept} R={s.reward:.3f}\n{s.prompt_text[:30]}"
            draw.text((x + 2, y + cell + 1), text, fill="black")
    tmp = path.with_name(path.name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


def save_reward_curves(path: Path, run_dir: Path) -> Path | None:
    """Plot reward (total and per expert) against step from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(run_dir) / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    keys = sorted({k for r in records for k in r if k.startswith("reward/") and k != "reward/std"})
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key.split("/", 1)[1],
                linewidth=2.5 if key == "reward/total" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("UniCTask-GRPO rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
