"""``python -m launch.bench_serve``: the command-line name of :mod:`launch.bench.serve` (the benchmarks live in ``launch/bench/``)."""
from launch.bench.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
