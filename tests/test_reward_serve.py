"""Reward experts on Ray Serve (issue #7): real local Ray on loopback, tiny experts, one replica = 0.1 CPU."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors.serving.deploy import (
    deploy_rewards,
    http_url,
    replicas,
    scale_expert,
    shutdown_rewards,
    wait_for_replicas,
)
from actors.serving.errors import RewardRequestError, RewardServiceError
from configs.serve import ALL_EXPERTS, ServeConfig
from rewards.base import ScoreBatch

slow = pytest.mark.slow

CATEGORIES = {"astro": "human", "chelsea": "animal", "cuppa": "object"}
IN_PROCESS = tuple(e for e in ALL_EXPERTS if e != "unipercept")  # UniPercept has its own env: test_unipercept_serve.py


# ------------------------------------------------------------------------------------------------ no Ray
def test_config_fields_documented_and_validated():
    import ast
    import inspect

    import actors.serving.deploy as mod
    from configs.loader import ConfigError, from_dict

    tree = ast.parse(inspect.getsource(mod))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("ServeConfig")):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                    f"{cls.name}.{node.target.id} has no docstring"
    cfg = from_dict(ServeConfig, {"der": {"num_replicas": 3, "preset": "tiny", "overrides": {"arch": "small"}}})
    assert cfg.der.num_replicas == 3 and cfg.tier.num_replicas == 1
    assert cfg.der.expert_config("der").arch == "small"
    assert cfg.der.expert_config("der").device == "cuda"  # num_gpus 0.25 by default: the expert goes to the GPU
    with pytest.raises(ConfigError, match="max_replicas"):
        from_dict(ServeConfig, {"fer": {"max_replicas": 0}})
    with pytest.raises(ConfigError, match="enabled"):
        from_dict(ServeConfig, {"enabled": ["der", "nope"]})
    with pytest.raises(ValueError, match="unknown field"):
        ServeConfig.tiny().der.__class__(overrides={"nope": 1}).expert_config("der")


def test_metrics_never_raise_on_zero_counts():
    from actors.serving import metrics as reward_metrics

    reward_metrics.count_scored("der", 0)  # Counter.inc(0) raises in Ray; the helper skips it
    reward_metrics.count_failure("der", "timeout", 0)


def test_batches_concatenate_and_split_by_signature():
    from actors.serving.replica import _signature, as_score_batch, concat

    a = ScoreBatch(images=np.zeros((2, 8, 8, 3), np.uint8), concepts=["x", "y"])
    b = ScoreBatch(images=np.ones((1, 8, 8, 3), np.uint8), concepts=["z"])
    c = ScoreBatch(images=np.ones((1, 9, 8, 3), np.uint8), concepts=["z"])
    assert _signature(a) == _signature(b) != _signature(c)
    ab = concat([a, b])
    assert len(ab) == 3 and ab.concepts == ["x", "y", "z"] and ab.images[2].max() == 1
    assert len(as_score_batch(a.to_dict())) == 2
    with pytest.raises(RewardRequestError, match="ScoreBatch"):
        as_score_batch(ScoreBatch(images=np.zeros((0, 8, 8, 3), np.uint8)))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The sample concept dataset (a real face for FER), written small."""
    from rl.data.sample import write_sample_dataset

    return str(write_sample_dataset(tmp_path_factory.mktemp("data") / "ds", image_size=160, log=lambda s: None))


@pytest.fixture(scope="module")
def references(data_root):
    from actors.serving.replica import references_from_root

    return references_from_root(data_root)[0]


def free_port() -> int:
    """A free loopback port (other sessions on this machine may run Serve on the default ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, data_root):
    """Every expert deployed once for the module (tier and der with HTTP routes); deleted afterwards."""
    cfg = ServeConfig.tiny()
    cfg.http_port = free_port()  # used if this module is the first to start Serve in the session
    cfg.enabled = list(IN_PROCESS)
    cfg.clip.required = False
    cfg.tier.http = cfg.der.http = True
    t0 = time.monotonic()
    handles = deploy_rewards(cfg, data_root=data_root)
    print(f"deployed {len(handles)} experts in {time.monotonic() - t0:.1f}s")
    yield cfg, handles
    shutdown_rewards(cfg)


@pytest.fixture(scope="module")
def direct(served, references):
    """The same experts built in this process, for reference scores."""
    from rewards.registry import build_expert

    cfg, _ = served
    experts = {}
    for name in IN_PROCESS:
        experts[name] = build_expert(name, cfg.expert(name).expert_config(name))
        for concept, images in references.items():
            if name != "fer" or CATEGORIES[concept] == "human":
                experts[name].add_reference(concept, images)
    return experts


def make_batch(references, n: int = 4, seed: int = 0, concepts=None) -> ScoreBatch:
    """Generated-looking images: noisy reference crops, with prompts, concepts and TIER fields."""
    rng = np.random.default_rng(seed)
    concepts = concepts or [list(CATEGORIES)[i % 3] for i in range(n)]
    images = []
    for c in concepts:
        ref = references[c][0][:128, :128].astype(np.int16)
        images.append(np.clip(ref + rng.integers(-20, 20, ref.shape), 0, 255).astype(np.uint8))
    return ScoreBatch(images=np.stack(images), texts=[f"a photo of a {CATEGORIES[c]} {i}" for i, c in enumerate(concepts)],
                      concepts=concepts, candidates=[["it wears a red collar", "it is a cup"]] * n,
                      targets=[int(rng.integers(0, 2)) for _ in range(n)])


def score(handle, batch, request_id=None, timeout_s=60.0) -> dict:
    return handle.options(method_name="score").remote(batch, request_id).result(timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------------ tests
@slow
def test_all_experts_match_direct_calls(served, direct, references):
    from actors.serving.client import RewardClient

    cfg, handles = served
    assert set(handles) == set(IN_PROCESS)
    for name in IN_PROCESS:
        assert [r["state"] for r in replicas(cfg, name)] == ["RUNNING"]
    batch = make_batch(references, n=6)
    for name, handle in handles.items():
        sub = batch.select([i for i, c in enumerate(batch.concepts) if name != "fer" or c == "astro"])
        out = score(handle, sub, request_id=name)
        assert out["expert"] == name and out["request_id"] == name
        np.testing.assert_allclose(out["scores"], direct[name].score(sub), rtol=1e-5, atol=1e-5, err_msg=name)
    categories = [CATEGORIES[c] for c in batch.concepts]
    result = RewardClient(cfg).score_all(batch, categories)
    assert result.dropped == [] and set(result.failures.values()) == {0}
    expected = {}
    for name in ("tier", "ber", "der", "fer"):
        rows = [i for i, c in enumerate(categories) if cfg.ensemble.weights[c].get(name, 0) > 0]
        expected[name] = np.zeros(len(batch), np.float32)
        expected[name][rows] = direct[name].score(batch.select(rows))
        np.testing.assert_allclose(result.per_expert[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    want = np.array([sum(w * expected[n][i] for n, w in cfg.ensemble.weights[c].items())
                     for i, c in enumerate(categories)], np.float32)
    np.testing.assert_allclose(result.total, want, rtol=1e-5, atol=1e-5)
    answers = ScoreBatch(texts=[f"answer {i}" for i in range(6)], candidates=batch.candidates, targets=batch.targets)
    own = RewardClient(cfg).score_all(batch, categories, expert_batches={"tier": answers})
    np.testing.assert_allclose(own.per_expert["tier"], direct["tier"].score(answers), rtol=1e-5, atol=1e-5)


@slow
def test_failing_optional_expert_is_dropped_and_required_one_raises(served, references, caplog):
    import copy

    from actors.serving.client import RewardClient

    cfg, _ = served
    batch = make_batch(references, n=3)  # human, animal, object
    categories = [CATEGORIES[c] for c in batch.concepts]
    broken = copy.deepcopy(cfg)
    broken.fer.required, broken.fer.timeout_s, broken.fer.retries = False, 1e-4, 1  # every attempt times out
    with caplog.at_level("WARNING"):
        result = RewardClient(broken).score_all(batch, categories)
    assert result.dropped == ["fer"] and result.failures["fer"] == 2 and "timeout" in result.errors["fer"]
    assert "fer" not in result.per_expert and any("dropped" in r.message for r in caplog.records)
    human = cfg.ensemble.weights["human"]
    scale = sum(human.values()) / (sum(human.values()) - human["fer"])
    assert result.weights["tier"][0] == pytest.approx(human["tier"] * scale)
    want = sum(human[n] * scale * result.per_expert[n][0] for n in ("tier", "ber", "der"))
    assert result.total[0] == pytest.approx(want, rel=1e-5)
    # required: only fer and tier deployed, so fer's attempts are the first collected (sorted experts), each right
    # after it was issued: a reply that arrived while other experts were collected would count (it is a reply)
    broken.fer.required, broken.enabled = True, ["fer", "tier"]
    for other in ("ber", "der", "clip"):
        broken.expert(other).required = False
    with pytest.raises(RewardServiceError, match="'fer'.*timeout"):
        RewardClient(broken).score_all(batch, categories)


@slow
def test_scale_one_expert_under_load(served, direct, references):
    import launch.scale

    cfg, handles = served
    others = {n: sorted(r["replica_id"] for r in replicas(cfg, n)) for n in IN_PROCESS if n != "der"}
    batches = [make_batch(references, n=2, seed=100 + i) for i in range(8)]
    expected = [direct["der"].score(b) for b in batches]
    answers: dict[int, list] = {}
    seen_replicas: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream():
        rid = 0
        try:
            while not stop.is_set():
                window = [(rid + k, handles["der"].options(method_name="score").remote(batches[(rid + k) % 8],
                                                                                      rid + k)) for k in range(4)]
                for i, resp in window:
                    out = resp.result(timeout_s=60)
                    answers.setdefault(i, []).append(out)
                    seen_replicas.add(out["replica"])
                rid += 4
        except BaseException as exc:  # noqa: BLE001 - surfaced by the main thread
            errors.append(exc)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    time.sleep(1.0)
    three = scale_expert("der", 3, cfg, timeout_s=180)
    assert len(three) == 3
    time.sleep(2.0)
    assert launch.scale.main(["der", "1", "--app-name", cfg.app_name]) == 0
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=120)
    assert not errors, errors
    assert len(wait_for_replicas(cfg, "der", 1, timeout_s=60)) == 1
    assert len(seen_replicas) >= 2, seen_replicas  # the new replicas did serve
    assert sorted(answers) == list(range(len(answers))) and len(answers) >= 8  # none lost
    for i, outs in answers.items():
        assert len(outs) == 1 and outs[0]["request_id"] == i  # none duplicated
        np.testing.assert_allclose(outs[0]["scores"], expected[i % 8], rtol=1e-5, atol=1e-5)
    assert {n: sorted(r["replica_id"] for r in replicas(cfg, n)) for n in others} == others


@slow
def test_replica_killed_mid_request_is_retried(ray_cluster, data_root, references, direct):
    import ray

    from actors.serving.client import RewardClient
    from rl.data.reader import load_concept_dataset

    cfg = ServeConfig.tiny()
    cfg.app_name = "rwkill"
    cfg.enabled = ["der"]
    cfg.der.batch_wait_timeout_s = 3.0  # the request sits in the replica long enough to kill it
    cfg.der.health_check_period_s = 0.5
    cfg.der.autoscale, cfg.der.min_replicas, cfg.der.max_replicas = True, 1, 2
    cfg.der.target_ongoing_requests = 8.0
    cfg.ensemble.weights = {"object": {"der": 1.0}}
    cfg.ensemble.required = ["der"]
    deploy_rewards(cfg, load_concept_dataset(data_root, concepts=["cuppa"]))  # a loaded dataset works too
    try:
        client = RewardClient(cfg)
        batch = make_batch(references, n=3, seed=7, concepts=["cuppa"] * 3)
        before = replicas(cfg, "der")
        box: dict = {}
        assert client.describe("der")["concepts"] == ["cuppa"]
        worker = threading.Thread(target=lambda: box.update(r=client.score_all(batch, ["object"] * 3)))
        worker.start()
        time.sleep(1.5)
        ray.kill(ray.get_actor(before[0]["actor_name"], namespace="serve"), no_restart=True)
        worker.join(timeout=120)
        result = box["r"]
        assert result.failures["der"] >= 1 and "replica_died" in result.errors["der"]
        assert client.failure_totals["der"] >= 1
        np.testing.assert_allclose(result.per_expert["der"], direct["der"].score(batch), rtol=1e-5, atol=1e-5)
        after = wait_for_replicas(cfg, "der", 1, timeout_s=60)
        assert after[0]["replica_id"] != before[0]["replica_id"]
        with pytest.raises(ValueError, match="autoscaled"):
            scale_expert("der", 2, cfg)
        with pytest.raises(ValueError, match="not deployed"):
            scale_expert("der", 2, "no-such-app")
    finally:
        shutdown_rewards(cfg)


@slow
def test_malformed_requests_fail_clearly_and_deployment_keeps_serving(served, references, direct):
    import msgpack
    import requests

    from actors.serving.client import RewardClient

    cfg, handles = served
    good = make_batch(references, n=2, seed=3)
    bad = {
        "float images": ScoreBatch(images=good.images.astype(np.float32), concepts=good.concepts),
        "no channel axis": ScoreBatch(images=good.images[..., 0], concepts=good.concepts),
        "empty batch": ScoreBatch(images=good.images[:0], concepts=[]),
        "missing field": ScoreBatch(images=good.images),
        "unknown concept": ScoreBatch(images=good.images, concepts=["nobody", "astro"]),
        "not a batch": "hello",
    }
    for what, payload in bad.items():
        with pytest.raises(RewardRequestError) as info:
            score(handles["der"], payload)
        assert "der" in str(info.value) or "ScoreBatch" in str(info.value), what
    url = http_url(cfg, "der")
    for body in (b"\xc1\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"images": {"dtype": "|u1"}})):
        resp = requests.post(url, data=body, timeout=30)
        assert resp.status_code == 400 and b"der" in resp.content
    client = RewardClient(cfg)
    with pytest.raises(ValueError):  # caught before it leaves the caller
        client.score_expert("der", ScoreBatch(images=good.images.astype(np.float32), concepts=good.concepts))
    cfg_missing = ServeConfig.tiny()
    cfg_missing.enabled = ["der"]
    with pytest.raises(RewardServiceError, match="not deployed"):
        RewardClient(cfg_missing).score_all(good, ["object", "object"])
    np.testing.assert_allclose(score(handles["der"], good)["scores"], direct["der"].score(good), atol=1e-5)


@slow
def test_http_route_matches_handle(served, references):
    import psutil

    from actors.serving.client import http_score

    cfg, handles = served
    batch = make_batch(references, n=3, seed=11)
    for name in ("der", "tier"):
        url = http_url(cfg, name)
        assert url.startswith("http://127.0.0.1:") and url.endswith(f"/rewards/{name}")
        np.testing.assert_allclose(http_score(url, batch), score(handles[name], batch)["scores"], atol=1e-6)
    port = int(url.split(":")[2].split("/")[0])
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening


@slow
def test_reward_metrics_reach_prometheus(served, references):
    import ray
    import requests

    cfg, handles = served
    score(handles["der"], make_batch(references, n=2, seed=5))
    port = ray._private.worker.global_worker.node.metrics_export_port
    want = ("ray_reward_serve_samples_scored_total", "ray_reward_serve_latency_s", "ray_reward_serve_queue_depth",
            "ray_reward_serve_failures_total", "ray_reward_serve_replicas")
    deadline, text = time.monotonic() + 45, ""
    while time.monotonic() < deadline:  # Ray exports about every 10 s
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    assert 'expert="der"' in text
