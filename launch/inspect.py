"""Show what a run trained on: a step's samples as a table, and a self-contained HTML report of the run.

examples:
    python -m launch.inspect runs/tiny-cpu                 # the last recorded step + runs/tiny-cpu/report.html
    python -m launch.inspect runs/tiny-cpu --step 3        # step 3 (counted from 1, as in the job log)
    python -m launch.inspect runs/tiny-cpu --step 3 --full # every sample's question, answer, prompts in full
    python -m launch.inspect runs/tiny-cpu --no-html       # the table only
    python -m launch.inspect runs/tiny-cpu --html /tmp/r.html --image-steps 0 --thumb 0   # every step, full size

The samples come from ``<run>/samples/step_<N>.jsonl`` (written every ``run.samples_every`` steps; pandas:
``pd.read_json(path, lines=True)``), the curves from ``<run>/metrics.jsonl``. The report (``<run>/report.html``
unless ``--html``) embeds its images as base64 and its charts as inline SVG: it opens offline, in any browser,
copied anywhere. A missing run folder or a run without records is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m launch.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder (<output_root>/<run.name>)")
    p.add_argument("--step", type=int, default=None, help="step to print, counted from 1 (default: the last recorded)")
    p.add_argument("--full", action="store_true", help="also print every sample's texts in full")
    p.add_argument("--width", type=int, default=None, help="table width in characters (default: the terminal's)")
    p.add_argument("--no-html", action="store_true", help="do not write the HTML report")
    p.add_argument("--html", default=None, help="where to write the report (default: <run>/report.html)")
    p.add_argument("--image-steps", type=int, default=20,
                   help="recorded steps whose samples the report shows, evenly spread (0 = all; default 20)")
    p.add_argument("--thumb", type=int, default=256,
                   help="longest side of the report's images in pixels (0 = full size; default 256)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the step's table, write the report; 2 with a one-line error when there is nothing to show."""
    args = parse_args(argv)
    from actors.telemetry.samples import format_details, format_table, read_samples

    width = args.width or shutil.get_terminal_size((160, 40)).columns
    try:
        step, rows = read_samples(args.run, args.step)
    except FileNotFoundError as exc:
        print(f"launch.inspect: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:   # a torn or foreign JSONL
        print(f"launch.inspect: {args.run}: unreadable sample records ({exc})", file=sys.stderr)
        return 2
    concepts = ", ".join(sorted({r["concept"] for r in rows}))
    mean = sum(r["reward"] for r in rows if r["reward"] is not None) / max(len(rows), 1)
    print(f"step {step}: {len(rows)} samples of {concepts}, mean reward {mean:.4f}")
    print(format_table(rows, width=width))
    if args.full:
        print()
        print(format_details(rows, width=min(width, 120)))
    if not args.no_html:
        from actors.telemetry.report import build_report

        try:
            path = build_report(args.run, args.html, image_steps=max(args.image_steps, 0), thumb=args.thumb or None)
        except (FileNotFoundError, ValueError) as exc:
            print(f"launch.inspect: {exc}", file=sys.stderr)
            return 2
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
