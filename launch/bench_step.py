"""``python -m launch.bench_step``: the command-line name of :mod:`launch.bench.step` (the benchmarks live in ``launch/bench/``)."""
from launch.bench.step import main

if __name__ == "__main__":
    raise SystemExit(main())
