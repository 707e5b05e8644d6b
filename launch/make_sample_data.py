"""Write the small sample concept dataset (a human, an animal, an object) in the UniCTokens / UnifyBench++ layout.

examples:
    python -m launch.make_sample_data data/sample
    python -m launch.make_sample_data /tmp/sample128 --image-size 128 --force
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """CLI entrypoint; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m launch.make_sample_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created; must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a sample dataset previously written there")
    p.add_argument("--image-size", type=int, default=512, help="side of the concept images in pixels")
    args = p.parse_args(argv)
    from rl.data.sample import write_sample_dataset

    t0 = time.perf_counter()
    try:
        write_sample_dataset(args.out, force=args.force, image_size=args.image_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
