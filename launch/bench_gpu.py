"""``python -m launch.bench_gpu``: the command-line name of :mod:`launch.bench.gpu` (the benchmarks live in ``launch/bench/``)."""
from launch.bench.gpu import main

if __name__ == "__main__":
    raise SystemExit(main())
