"""``python -m launch.bench_rollout``: the command-line name of :mod:`launch.bench.rollout` (the benchmarks live in ``launch/bench/``)."""
from launch.bench.rollout import main

if __name__ == "__main__":
    raise SystemExit(main())
