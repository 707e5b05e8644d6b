"""Weight sync (D11): bucket plans, bit-exact bucketed broadcast over a standalone gloo group, concept-row syncs,
clear errors and timeouts instead of hangs. Fast tests run the group in threads; slow ones go through Ray actors."""
from __future__ import annotations

import functools
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from actors.cluster.weight_sync import (
    SyncGroup,
    WeightReceiver,
    WeightSyncError,
    WeightSyncTimeout,
    plan_buckets,
    send_weights,
)
from actors.learner.step import ToyBackend
from configs.learner import SyncConfig
from rl.grpo.config import ObjectiveConfig


def mixed_model(seed: int) -> nn.Module:
    """fp32 + bf16 parameters, several sizes."""
    torch.manual_seed(seed)
    m = nn.ModuleDict({"emb": nn.Embedding(40, 16), "a": nn.Linear(16, 32), "b": nn.Linear(32, 8)})
    m["b"].to(torch.bfloat16)
    return m


class _Outcome:
    """A helper thread's result: what its function raised (or None), read back in the test thread."""

    def __init__(self, fn):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)

    def _run(self, fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread by outcome()
            self.error = exc

    def outcome(self, timeout_s: float) -> BaseException | None:
        """Join the thread (a thread still running after ``timeout_s`` fails the test) and return its exception."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"helper thread still running after {timeout_s}s"
        return self.error


def start_thread(fn) -> _Outcome:
    """Run ``fn`` in a started daemon thread; ``.outcome()`` gives its exception to the test thread (an assertion
    or ``pytest.raises`` inside a helper thread is lost: pytest only sees the test thread)."""
    out = _Outcome(fn)
    out.thread.start()
    return out


def run_group(sender_model, receiver_models, plan, timeout_s=20.0):
    """Sender (rank 0) + receivers in threads; returns (sender stats, receiver stats or exceptions)."""
    world = 1 + len(receiver_models)
    g0 = SyncGroup("127.0.0.1", 0, 0, world, "gloo", timeout_s)
    results: list = [None] * len(receiver_models)

    def recv(i):
        try:
            r = WeightReceiver(SyncConfig(timeout_s=timeout_s, backend="gloo"))
            r.init_group("127.0.0.1", g0.port, i + 1, world)
            r.receive(receiver_models[i])
            results[i] = r.last_stats
        except Exception as e:  # noqa: BLE001 – reported to the test
            results[i] = e

    threads = [threading.Thread(target=recv, args=(i,)) for i in range(len(receiver_models))]
    for t in threads:
        t.start()
    try:
        g0.join()
        out = send_weights(g0, sender_model, plan)
    except Exception as e:  # noqa: BLE001
        out = e
    for t in threads:
        t.join(timeout=timeout_s * 3)
    g0.close()
    return out, results


def test_plan_buckets_are_dtype_grouped_sized_and_complete():
    m = mixed_model(0)
    plan = plan_buckets(m, bucket_mb=2048 / 2**20)  # 2 KiB buckets
    names = [s.name for b in plan.buckets for s in b]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())
    assert len(plan.buckets) > 3
    for b in plan.buckets:
        assert len({s.dtype for s in b}) == 1
        nbytes = sum(s.numel * (2 if s.dtype == "torch.bfloat16" else 4) for s in b)
        assert nbytes <= 2048 or len(b) == 1
    rows = plan_buckets(m, 1.0, rows=[3, 7], row_params=("emb.weight",))
    assert [(s.name, s.shape) for b in rows.buckets for s in b] == [("emb.weight", (2, 16))]
    with pytest.raises(ValueError, match="not in the model"):
        plan_buckets(m, 1.0, only=("nope",))


def test_threaded_sync_is_bit_exact_with_many_buckets():
    src, dst = mixed_model(0), [mixed_model(1), mixed_model(2)]
    plan = plan_buckets(src, bucket_mb=1024 / 2**20)
    out, res = run_group(src, dst, plan)
    assert not isinstance(out, Exception), out
    assert out["sync_buckets"] == len(plan.buckets) >= 4 and out["sync_bytes"] == plan.num_bytes
    for r, model in zip(res, dst):
        assert isinstance(r, dict), r
        for (n, p), (_, q) in zip(src.named_parameters(), model.named_parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q), n


def test_concept_rows_sync_moves_only_those_rows():
    src, dst = mixed_model(0), mixed_model(1)
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    rows = [0, 5, 39]
    out, res = run_group(src, [dst], plan_buckets(src, 1.0, rows=rows, row_params=("emb.weight",)))
    assert isinstance(res[0], dict), res[0]
    assert out["sync_bytes"] == len(rows) * 16 * 4
    e_src, e_dst = src["emb"].weight, dst["emb"].weight
    assert torch.equal(e_dst[rows], e_src[rows])
    others = [i for i in range(40) if i not in rows]
    assert torch.equal(e_dst[others], before["emb.weight"][others])
    for n, p in dst.named_parameters():
        if n != "emb.weight":
            assert torch.equal(p, before[n]), n


def test_receiver_with_other_shapes_fails_clearly_on_both_sides():
    src = mixed_model(0)
    bad = nn.ModuleDict({"emb": nn.Embedding(41, 16), "a": nn.Linear(16, 32), "b": nn.Linear(32, 8)})
    out, res = run_group(src, [bad], plan_buckets(src, 1.0), timeout_s=10.0)
    assert isinstance(res[0], WeightSyncError) and "emb.weight" in str(res[0]), res[0]
    assert isinstance(out, WeightSyncError) and "rejected the plan" in str(out), out


def test_peer_that_never_joins_times_out_naming_it():
    g0 = SyncGroup("127.0.0.1", 0, 0, 3, "gloo", 2.0, peers=["learner rank 0", "rollout A", "rollout B"])
    assert g0._listen.getsockname()[0] == "127.0.0.1", "the store must listen on loopback only"

    def only_a():
        WeightReceiver(SyncConfig(timeout_s=2.0, backend="gloo")).init_group(
            "127.0.0.1", g0.port, 1, 3, peers=g0.peers)

    a = start_thread(only_a)
    t0 = time.perf_counter()
    with pytest.raises(WeightSyncTimeout, match=r"never joined: \['rollout B'\]"):
        g0.join()
    assert time.perf_counter() - t0 < 6.0
    error = a.outcome(timeout_s=10.0)   # the joined peer's own failure, asserted here in the test thread
    g0.close()
    assert isinstance(error, WeightSyncTimeout), f"rollout A should time out too, got {error!r}"
    assert "rollout B" in str(error), error


def test_receive_before_init_is_an_error():
    with pytest.raises(WeightSyncError, match="init_group"):
        WeightReceiver().receive(mixed_model(0))


# -- through Ray: LearnerGroup rank 0 → rollout actors --------------------------------------------------------


class ToyRollout:
    """A rollout-actor stand-in with the receiver API the learner group calls."""

    def __init__(self, seed: int, sync: SyncConfig):
        self.model = ToyBackend(ObjectiveConfig(), seed=seed).module
        self.receiver = WeightReceiver(sync)

    def init_weight_sync(self, address, port, rank, world_size):
        return self.receiver.init_group(address, port, rank, world_size)

    def receive_weights(self):
        return self.receiver.receive(self.model)

    def state_dict(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}


class SilentRollout:
    """A peer that never joins the group (e.g. wedged in a long generation)."""

    def init_weight_sync(self, address, port, rank, world_size):
        return 0.0

    def receive_weights(self):
        return 0.0


def toy_cfg(bucket_mb: float, timeout_s: float) -> SimpleNamespace:
    from configs.learner import LearnerConfig

    lc = LearnerConfig.tiny()
    lc.num_ranks, lc.lr, lc.num_cpus_per_rank = 1, 1e-2, 0.5
    return SimpleNamespace(learner=lc, objective=ObjectiveConfig.tiny(),
                           sync=SyncConfig(bucket_mb=bucket_mb, backend="gloo", timeout_s=timeout_s))


@pytest.mark.slow
def test_learner_to_rollout_actors_bit_exact_then_timeout_then_recover(ray_cluster):
    import sys

    import ray
    from ray import cloudpickle
    from test_learner import toy_samples

    from actors.learner.group import LearnerGroup

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

    cfg = toy_cfg(bucket_mb=256 / 2**20, timeout_s=5.0)  # 256-byte buckets → many buckets for the toy model
    group = LearnerGroup(cfg, backend_factory=functools.partial(ToyBackend.factory, seed=7))
    Rollout = ray.remote(num_cpus=0)(ToyRollout)
    actors = [Rollout.remote(seed=100 + i, sync=cfg.sync) for i in range(2)]
    silent = ray.remote(num_cpus=0)(SilentRollout).remote()
    ray.get([a.state_dict.remote() for a in actors])  # started: the 5 s bound is for the rendezvous, not start-up
    try:
        for step in range(2):
            group.train_step(toy_samples(3, seed=step))
            seconds = group.sync_weights(actors)
            assert seconds >= 0 and group.last_sync["sync_buckets"] > 4
            want = group.state_dict_rank0()
            for sd in ray.get([a.state_dict.remote() for a in actors]):
                for k in want:
                    assert torch.equal(sd[k], want[k]), k
        t0 = time.perf_counter()
        with pytest.raises(WeightSyncTimeout, match="rollout actor 2"):
            group.sync_weights(actors + [silent])
        assert time.perf_counter() - t0 < 5.0 + 10.0
        group.train_step(toy_samples(3, seed=9))  # the learner survives; a later sync re-forms the group
        group.sync_weights(actors)
        want = group.state_dict_rank0()
        sd = ray.get(actors[0].state_dict.remote())
        assert all(torch.equal(sd[k], want[k]) for k in want)
    finally:
        group.shutdown()
        for a in actors + [silent]:
            ray.kill(a)


class ShowoRollout(ToyRollout):
    """Receiver holding the same tiny Show-o the learner starts from."""

    def __init__(self, sync: SyncConfig):
        from backbone.build import ConceptSpec, build_policy
        from backbone.config import ModelConfig

        self.model = build_policy(ModelConfig.tiny(), [ConceptSpec("bo", "dog")]).model
        self.receiver = WeightReceiver(sync)


@pytest.mark.slow
def test_showo_concept_rows_sync_sends_only_the_rows(ray_cluster):
    import sys

    import ray
    from ray import cloudpickle
    from test_learner import policy_cfg, showo_samples, showo_setup

    from actors.learner.group import LearnerGroup
    from actors.learner.step import make_showo_backend

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    policy, concepts, scfg, obj = showo_setup(timesteps=2)
    cfg = toy_cfg(bucket_mb=1.0, timeout_s=20.0)
    cfg.learner.trainable = "concept_rows"
    cfg.objective, cfg.model, cfg.sampler = obj, policy_cfg(), scfg
    cfg.rollout = SimpleNamespace(answer_temperature=1.0, answer_top_k=None)
    group = LearnerGroup(cfg, backend_factory=functools.partial(make_showo_backend, concepts=concepts))
    rollout = ray.remote(num_cpus=0)(ShowoRollout).remote(cfg.sync)
    ray.get(rollout.state_dict.remote())
    try:
        init = group.state_dict_rank0()
        group.train_step(showo_samples(policy, scfg, 2))
        group.sync_weights([rollout])
        want, got = group.state_dict_rank0(), ray.get(rollout.state_dict.remote())
        rows = sorted(policy.concepts["bo"].all_ids)
        hidden = want["model.embed_tokens.weight"].shape[1]
        assert group.last_sync["sync_bytes"] == len(rows) * (2 * hidden + 1) * 4
        for k in want:
            assert torch.equal(got[k], want[k]), k
        moved = [k for k in want if not torch.equal(init[k], want[k])]
        assert sorted(moved) == ["lm_head.bias", "lm_head.weight", "model.embed_tokens.weight"]
        other = [i for i in range(want["lm_head.weight"].shape[0]) if i not in rows]
        assert torch.equal(init["lm_head.weight"][other], want["lm_head.weight"][other])
    finally:
        group.shutdown()
        ray.kill(rollout)
