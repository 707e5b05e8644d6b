"""``python -m launch.bench_unipercept``: the command-line name of :mod:`launch.bench.unipercept` (the benchmarks live in ``launch/bench/``)."""
from launch.bench.unipercept import main

if __name__ == "__main__":
    raise SystemExit(main())
