"""``python -m launch.bench_rewards``: the command-line name of :mod:`launch.bench.rewards` (the benchmarks live in ``launch/bench/``)."""
from launch.bench.rewards import main

if __name__ == "__main__":
    raise SystemExit(main())
