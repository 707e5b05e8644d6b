"""Shared test set-up: offline hubs, loopback-only Ray, one Ray cluster per test session."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


LOCKS_ENV = "UNICTASK_TEST_LOCKS"
"""Folder of the machine-share lock files of one pytest run, made by the controller, inherited by xdist workers."""


@contextlib.contextmanager
def machine_share(folder: str, exclusive: bool):
    """Between the pytest-xdist workers of one run: held shared by every test, exclusively by a test marked
    ``exclusive``, which so runs while no other test does. A turnstile lets a waiting exclusive test in before new
    shared holders (no starvation)."""
    with open(os.path.join(folder, "turnstile"), "a+") as turnstile, open(os.path.join(folder, "lock"), "a+") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def pytest_configure(config):
    """The xdist controller (``-n N``) makes the run's lock folder before any worker starts."""
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", default=None):
        os.environ[LOCKS_ENV] = tempfile.mkdtemp(prefix="unictask-test-locks-")


def pytest_unconfigure(config):
    """The controller removes the run's lock folder after every worker has ended."""
    if not hasattr(config, "workerinput") and LOCKS_ENV in os.environ:
        shutil.rmtree(os.environ.pop(LOCKS_ENV), ignore_errors=True)


LONGEST_FIRST = ("test_kill_matrix.py", "test_service.py", "test_multinode.py", "test_faults.py", "test_overlap.py",
                 "test_operator_clients.py", "test_run_ownership.py", "test_new_concept.py", "test_job_submit.py",
                 "test_released_layout.py")
"""The modules that take longest (2-core figures: 11 min down to 1.5), run first: under ``pytest -n 2 --dist
loadscope`` a worker takes whole modules in this order, so no long module starts last and runs alone at the end."""


def pytest_collection_modifyitems(session, config, items):
    """Puts :data:`LONGEST_FIRST` ahead of the rest; the order within a module, and of the others, is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist (``-n 2``), a test marked ``exclusive`` (it arms a machine-wide memory threshold) waits until
    the other worker's test ends and keeps the other worker waiting until it ends, fixtures' set-up and teardown
    included. Serial runs take no lock."""
    folder = os.environ.get(LOCKS_ENV)
    if "PYTEST_XDIST_WORKER" not in os.environ or not folder:
        yield
        return
    with machine_share(folder, item.get_closest_marker("exclusive") is not None):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on 127.0.0.1 shared by every test that asks for it; stopped at session end."""
    import ray

    from actors.cluster.ray_env import start_local_ray

    info = start_local_ray(num_cpus=4, include_dashboard=False)
    yield info
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """The bundled sample dataset at 128 px, written once per test session (read-only for tests)."""
    from rl.data.sample import write_sample_dataset

    root = tmp_path_factory.mktemp("data") / "sample"
    write_sample_dataset(root, image_size=128, log=lambda *_: None)
    return root


TINY_TRAINER_OVERRIDES = ["rollout.group_size=3", "sampler.timesteps=8", "dsog.screen_step=3",
                          "rollout.answer_max_new_tokens=8"]
"""Shrinks the tiny CPU config further for service tests (G 3, T 8)."""


SHARED_POOL_APP = "test-shared-rewards"
"""``serve.app_name`` of the session's shared reward pool (:func:`shared_rewards`)."""

@pytest.fixture(scope="session")
def shared_rewards(ray_cluster, sample_root):
    """The trainer overrides (``serve.mode=shared``) of one reward pool deployed once per session on the sample
    dataset, every expert scoring one request at a time (``max_batch_size`` 1: a reward cannot depend on which
    requests a batch merged).

    Runs whose subject is not the reward deployment itself attach to it instead of deploying their own four
    experts (about 30 s of set-up each on 2 cores); the owned path (deploy, stale-app replacement, deletion at the
    end, replica kills) keeps its own tests. Deleted at session end."""
    from actors.serving.deploy import deploy_rewards, shutdown_rewards
    from configs.schema import load_config

    cfg = load_config("tiny_cpu", [f"data.root={sample_root}", f"serve.app_name={SHARED_POOL_APP}"])
    for expert in cfg.serve.enabled:
        ecfg = cfg.serve.expert(expert)
        ecfg.max_batch_size = 1
        # health checks (a one-sample self-score each) every 10 s, not the tiny preset's 2 s: this pool idles for
        # most of the session
        ecfg.health_check_period_s = 10.0
    deploy_rewards(cfg.serve, data_root=str(sample_root))
    yield ["serve.mode=shared", f"serve.app_name={SHARED_POOL_APP}"]
    shutdown_rewards(cfg.serve)


def make_trainer_factory(extra=()):
    """``build(out_dir, root, overrides=(), resume=None)``: a set-up :class:`actors.driver.trainer.Trainer` on the tiny
    config shrunk by :data:`TINY_TRAINER_OVERRIDES`, then ``extra`` (e.g. :func:`shared_rewards`), then the caller's
    overrides (the caller calls ``shutdown``)."""
    from actors.driver.trainer import Trainer
    from configs.schema import load_config

    def build(out_dir, root, overrides=(), resume=None):
        cfg = load_config("tiny_cpu", [f"data.root={root}", f"run.output_root={out_dir}", *TINY_TRAINER_OVERRIDES,
                                       *extra, *overrides])
        trainer = Trainer(cfg, resume=resume)
        trainer.setup()
        return trainer

    return build


def record_samples(trainer, seen: dict) -> None:
    """Wrap ``trainer.train_step`` so that ``seen[step]`` gets each step's (concept, prompt, reward) per sample."""
    step_fn = trainer.train_step

    def recorded(step):
        metrics = step_fn(step)
        seen[step] = [(s.concept, s.prompt_text, s.reward) for s in trainer._last_samples]
        return metrics
    trainer.train_step = recorded


@pytest.fixture
def make_trainer():
    """Factory: a set-up :class:`actors.driver.trainer.Trainer` on the tiny config (caller calls ``shutdown``)."""
    return make_trainer_factory()


@pytest.fixture
def make_shared_trainer(shared_rewards):
    """Like :func:`make_trainer`, the trainer attached to the session's shared reward pool."""
    return make_trainer_factory(shared_rewards)


@pytest.fixture(scope="session")
def unipercept_python():
    """UniPercept's overlay environment's interpreter, built once by the project command when missing or stale
    (``python -m launch.build_reward_env unipercept``; from the package registry)."""
    from launch.build_reward_env import build_env, env_python
    from rewards.expert_env import default_dest

    build_env("unipercept", log=print)
    return env_python(default_dest("unipercept"))


@pytest.fixture(scope="module")
def unipercept_tiny(unipercept_python):
    """The tiny UniPercept expert run directly in the overlay interpreter (over a pipe, no Ray); closed after the
    module."""
    from rewards.registry import build_expert

    e = build_expert("unipercept", "tiny", python=str(unipercept_python))
    yield e
    e.close()
