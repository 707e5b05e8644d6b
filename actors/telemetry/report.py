"""A self-contained HTML report of a run (``<run>/report.html``), written by ``python -m launch.inspect``.

One file a browser opens offline, with no external asset (no script, font, style sheet or image is fetched):

- a summary (steps, last / best reward, DSOG totals, records);
- reward curves (ensemble reward ± std and each expert's mean, from ``metrics.jsonl``) and DSOG curves (pass rate,
  threshold, attempts per sample) as inline SVG;
- a per-step table of the scalars that judge a step (reward, advantage spread, DSOG, loss, KL);
- the recorded steps' samples (:mod:`actors.telemetry.samples`): each kept image as a base64 ``data:`` URI with its
  task, question, answer, compound prompt, reward text, per-expert rewards, advantage and DSOG attempts.

Standard library only, except Pillow when images are shrunk to thumbnails (``thumb``).
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import math
from pathlib import Path

from actors.telemetry.logger import read_metrics
from actors.telemetry.samples import display_text, expert_columns, list_steps, read_samples, samples_dir

REPORT_FILE = "report.html"
"""File name of the report inside the run folder."""

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px}.charts{display:flex;flex-wrap:wrap;gap:16px}
svg{background:#fff;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;background:#fff;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
.sample img{width:100%;height:auto;image-rendering:auto;border-radius:4px;display:block}
.sample dl{margin:6px 0 0;display:grid;grid-template-columns:auto 1fr;gap:2px 6px}
.sample dt{color:#666}.sample dd{margin:0;word-break:break-word}
.tag{display:inline-block;border-radius:3px;padding:0 5px;font-size:11px;color:#fff}
.kept{background:#2ca02c}.redrawn{background:#ff7f0e}.forced{background:#d62728}.unscreened{background:#888}
.pos{color:#1a7f37}.neg{color:#b42318}
"""


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, digits: int | None = 4, signed: bool = False) -> str:
    """A number with ``digits`` decimals (None: 3 significant digits), ``-`` when missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if digits is None:
            return f"{v:.3g}"
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return str(v)


# -- charts -------------------------------------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], band: list[tuple[float, float, float]] = (),
              ylabel: str = "", xlabel: str = "step", lines: bool = True, width: int = 396, height: int = 280) -> str:
    """A chart as inline SVG: one polyline with dots per series (``lines=False``: dots only, a scatter plot), an
    optional shaded band (x, lo, hi) behind the first series, axes with ticks, a legend. Non-finite points are left
    out. ``xlabel="step"`` puts integer ticks on the x axis."""
    pts = {k: [(x, y) for x, y in v if _finite(x) and _finite(y)] for k, v in series.items()}
    band = [(x, lo, hi) for x, lo, hi in band if _finite(x) and _finite(lo) and _finite(hi)]
    xs = [x for v in pts.values() for x, _ in v] + [x for x, _, _ in band]
    ys = [y for v in pts.values() for _, y in v] + [y for _, lo, hi in band for y in (lo, hi)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" font-weight="600">{_esc(title)}</text>']
    if not xs:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(out)
    left, right, top, bottom = 58, 12, 30, 66
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.1, 0.05)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">{t:.4g}</text>')
    if xlabel == "step":
        xt = [t for t in _ticks(x0, x1, min(8, max(1, int(x1 - x0)))) if abs(t - round(t)) < 1e-9]
    else:
        xt = _ticks(x0, x1)
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#444"/>'
                   f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{t:.4g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>'
               f'<text x="{left + pw / 2}" y="{top + ph + 32}" text-anchor="middle" font-size="12">{_esc(xlabel)}'
               f'</text>'
               f'<text x="14" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {top + ph / 2})">{_esc(ylabel)}</text>')
    if band:
        poly = [(sx(x), sy(hi)) for x, _, hi in band] + [(sx(x), sy(lo)) for x, lo, _ in reversed(band)]
        out.append('<polygon fill="#000" fill-opacity="0.10" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in poly) + '"/>')
    legend_x, legend_y = left, height - 20
    for i, (name, v) in enumerate(pts.items()):
        colour = "#000" if i == 0 and band else _PALETTE[i % len(_PALETTE)]
        w = 2.5 if i == 0 else 1.4
        if v and lines:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{w}" points="'
                       + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v) + '"/>')
        if len(v) <= 60 or not lines:
            r = 2.5 if lines else 3.5
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{colour}" fill-opacity="0.8"/>'
                    for x, y in v]
        if legend_x + 16 + 7 * len(name) > width and legend_x > left:   # wrap the legend onto a second row
            legend_x, legend_y = left, legend_y + 14
        out.append(f'<rect x="{legend_x}" y="{legend_y - 5}" width="12" height="4" fill="{colour}"/>'
                   f'<text x="{legend_x + 16}" y="{legend_y}" font-size="11">{_esc(name)}</text>')
        legend_x += 24 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)


# -- images -------------------------------------------------------------------------------------------------------
def data_uri(path: Path, thumb: int | None = 256) -> str | None:
    """A ``data:image/png;base64,...`` URI of a PNG (shrunk so its longer side is at most ``thumb``; None = as is),
    or None when the file is missing or unreadable."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    if thumb:
        try:
            from PIL import Image

            img = Image.open(io.BytesIO(raw))
            if max(img.size) > thumb:
                img.thumbnail((thumb, thumb))
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                raw = buf.getvalue()
        except Exception:   # an unreadable PNG: embed it as is, the page shows it broken rather than hide it
            pass
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


# -- sections -----------------------------------------------------------------------------------------------------
def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"] + 1, r.get(key)) for r in records]


def _summary(run: Path, records: list[dict], steps: list[int]) -> str:
    last = records[-1] if records else {}
    rewards = [r.get("reward/total") for r in records if _finite(r.get("reward/total"))]
    best = max(range(len(records)), key=lambda i: records[i].get("reward/total", -math.inf)) if rewards else None
    cards = [("steps logged", str(len(records))),
             ("last reward", _fmt(last.get("reward/total"))),
             ("best reward", f"{_fmt(records[best]['reward/total'])} (step {records[best]['step'] + 1})"
              if best is not None else "-"),
             ("mean DSOG pass rate", _fmt(_mean([r.get("dsog/pass_rate") for r in records]), 3)),
             ("forced keeps", _fmt(sum(r.get("dsog/forced_keeps", 0) for r in records
                                       if _finite(r.get("dsog/forced_keeps"))), 0)),
             ("recorded steps", str(len(steps)))]
    return '<div class="cards">' + "".join(f'<div class="card"><span class="muted">{_esc(k)}</span><b>{_esc(v)}</b>'
                                           f'</div>' for k, v in cards) + "</div>"


def _mean(vals) -> float | None:
    vals = [v for v in vals if _finite(v)]
    return sum(vals) / len(vals) if vals else None


def _charts(records: list[dict], rows: list[dict]) -> str:
    """Reward, advantage spread and DSOG curves from the metrics; screen score against reward from the records."""
    experts = sorted({k for r in records for k in r if k.startswith("reward/")} - {"reward/total", "reward/std"})
    band = [(r["step"] + 1, r["reward/total"] - r["reward/std"], r["reward/total"] + r["reward/std"])
            for r in records if _finite(r.get("reward/total")) and _finite(r.get("reward/std"))]
    charts = [svg_chart("Reward", {"total": _series(records, "reward/total"),
                                   **{k.split("/", 1)[1]: _series(records, k) for k in experts}},
                        band=band, ylabel="reward"),
              svg_chart("Advantage spread", {"adv std": _series(records, "adv/std"),
                                             "equal-reward groups": _series(records, "adv/equal_reward_groups")},
                        ylabel="value"),
              svg_chart("DSOG screen", {"pass rate": _series(records, "dsog/pass_rate"),
                                        "threshold": _series(records, "dsog/threshold")}, ylabel="value"),
              svg_chart("DSOG attempts", {"attempts / sample": _series(records, "dsog/attempts_per_sample"),
                                          "forced keeps": _series(records, "dsog/forced_keeps")}, ylabel="count")]
    outcomes = {}
    for r in rows:
        if _finite(r.get("screen_score")) and _finite(r.get("reward")):
            outcomes.setdefault(r["dsog"], []).append((r["screen_score"], r["reward"]))
    if outcomes:
        charts.append(svg_chart("Screen score vs reward (recorded samples)",
                                {k: outcomes[k] for k in ("kept", "redrawn", "forced") if k in outcomes},
                                xlabel="screen score of the kept attempt", ylabel="reward", lines=False))
    return '<div class="charts">' + "".join(charts) + "</div>"


def _outcome_counts(rows: list[dict]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r["step"], {})
        c[r["dsog"]] = c.get(r["dsog"], 0) + 1
    return out


_STEP_COLUMNS = [("reward/total", "reward", 4), ("reward/std", "std", 4), ("adv/std", "adv sd", 4),
                 ("adv/equal_reward_groups", "eq groups", 2), ("dsog/pass_rate", "pass", 3),
                 ("dsog/threshold", "threshold", 4), ("dsog/next_threshold", "next thr", 4),
                 ("dsog/attempts_per_sample", "att/sample", 2), ("dsog/forced_keeps", "forced", 0),
                 ("dsog/screen_reward_corr", "screen~R", 3), ("learn/loss", "loss", None), ("learn/kl", "kl", None),
                 ("time/step", "sec", 2)]


def _step_table(records: list[dict], outcomes: dict[int, dict[str, int]]) -> str:
    """One row per logged step: its scalars, and the DSOG outcome of its samples where the step was recorded."""
    head = "".join(f"<th>{_esc(h)}</th>" for _, h, _ in _STEP_COLUMNS)
    rows = []
    for r in records:
        cells = "".join(f"<td>{_fmt(r.get(k), d)}</td>" for k, _, d in _STEP_COLUMNS)
        c = outcomes.get(r["step"] + 1)
        kept = "/".join(str(c.get(k, 0)) for k in ("kept", "redrawn", "forced")) if c else "-"
        rows.append(f'<tr><td>{r["step"] + 1}</td><td class="l">{_esc(r.get("concepts", ""))}</td>{cells}'
                    f'<td>{kept}</td></tr>')
    return (f'<table id="steps"><tr><th>step</th><th class="l">concept</th>{head}<th>kept/redrawn/forced</th></tr>'
            f'{"".join(rows)}</table>')


def _sample_card(run: Path, row: dict, thumb: int | None) -> str:
    uri = data_uri(samples_dir(run) / row["image"], thumb)
    img = (f'<img src="{uri}" alt="{_esc(row["image"])}" data-sample="{row["prompt_index"]}/{row["sample_index"]}">'
           if uri else f'<div class="muted">image {_esc(row["image"])} missing</div>')
    adv = row.get("advantage")
    experts = " ".join(f'{e[len("reward_"):]} {_fmt(row[e], 3)}' for e in expert_columns([row]))
    scores = ", ".join(_fmt(x, 3) for x in row.get("attempt_scores") or []) or "-"
    fields = [("R", f'<b class="reward">{_fmt(row.get("reward"))}</b>  A <span class="'
                    f'{"pos" if (adv or 0) >= 0 else "neg"}">{_fmt(adv, 4, signed=True)}</span>'),
              ("experts", _esc(experts)),
              ("DSOG", f'<span class="tag {_esc(row["dsog"])}">{_esc(row["dsog"])}</span> {row["attempts"]} '
                       f'attempt(s): {_esc(scores)} (thr {_fmt(row.get("threshold"), 3)})'),
              ("task", _esc(f'{row["task"]} · {row.get("input_image", "")}')),
              ("question", _esc(display_text(row["question"]))), ("answer", _esc(display_text(row["answer"]))),
              ("reference", _esc(display_text(row.get("reference", "")))),
              ("prompt", _esc(display_text(row["compound_prompt"])) + (" <i>(IR cut)</i>" if row.get("prompt_cut")
                                                                       else "")),
              ("reward text", _esc(display_text(row["reward_text"])))]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in fields)
    return (f'<div class="sample"><div class="muted">#{row["prompt_index"]}/{row["sample_index"]} '
            f'{_esc(row["concept"])} ({_esc(row["category"])})</div>{img}<dl>{dl}</dl></div>')


def pick_steps(steps: list[int], limit: int) -> list[int]:
    """At most ``limit`` of ``steps`` (0 = all), evenly spread, always with the first and the last."""
    if not limit or len(steps) <= limit:
        return list(steps)
    if limit == 1:
        return [steps[-1]]
    idx = sorted({round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)})
    return [steps[i] for i in idx]


def build_report(run_dir: Path | str, out: Path | str | None = None, image_steps: int = 20,
                 thumb: int | None = 256) -> Path:
    """Write the run's HTML report (default ``<run>/report.html``, atomically) and return its path.

    ``image_steps``: recorded steps whose samples are shown (evenly spread, 0 = all); ``thumb``: longest image side
    in pixels (None = full size). Raises FileNotFoundError (one line) when the run folder is missing or holds neither
    metrics nor sample records."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder {run}")
    records = sorted(read_metrics(run), key=lambda r: r.get("step", 0))
    steps = list_steps(run)
    if not records and not steps:
        raise FileNotFoundError(f"{run} has neither metrics.jsonl nor sample records: not a run folder?")
    shown = pick_steps(steps, image_steps)
    by_step = {r["step"] + 1: r for r in records}
    recorded = {step: read_samples(run, step)[1] for step in steps}
    every_row = [r for rows in recorded.values() for r in rows]
    parts = []
    for step in reversed(shown):
        rows = recorded[step]
        m = by_step.get(step, {})
        head = (f'step {step} · {_esc(m.get("concepts", ""))} · reward {_fmt(m.get("reward/total"))} · '
                f'{len(rows)} samples')
        cards = "".join(_sample_card(run, r, thumb) for r in rows)
        parts.append(f'<details open id="step-{step}"><summary><b>{head}</b></summary>'
                     f'<div class="samples">{cards}</div></details>')
    note = (f'<p class="muted">showing {len(shown)} of {len(steps)} recorded steps, newest first '
            f'(<code>--image-steps</code>)</p>' if len(shown) < len(steps) else "")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (f"<h1>{_esc(run.name)}</h1><div class='muted'>{_esc(run.resolve())} · report written {now}</div>"
            f"{_summary(run, records, steps)}<h2>Curves</h2>{_charts(records, every_row)}"
            f"<h2>Steps</h2>{_step_table(records, _outcome_counts(every_row))}<h2>Samples</h2>{note}"
            + ("".join(parts) or '<p class="muted">no sample records (run.samples_every: 0?)</p>'))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(run.name)} · UniCTask-GRPO '
            f'report</title><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
    path = Path(out) if out is not None else run / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
