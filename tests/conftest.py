"""Shared test set-up: offline hubs, loopback-only Ray, one Ray cluster per test session."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on 127.0.0.1 shared by every test that asks for it; stopped at session end."""
    from actors.ray_env import start_local_ray

    import ray

    info = start_local_ray(num_cpus=4, include_dashboard=False)
    yield info
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
