"""Learner: D12 unit schedule, unit losses = D5 loss, DeepSpeed 2-rank gradient = single-process gradient, ranks stay
identical, placement errors. Ray tests use the session cluster and tiny modules (``ToyBackend``)."""
from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.learner.group import deepspeed_config
from actors.learner.step import ReplayUnit, ToyBackend, build_units, run_units, schedule_units
from configs.learner import LearnerConfig, SyncConfig
from rl.grpo.batch import RolloutSample
from rl.grpo.config import ObjectiveConfig
from rl.grpo.objective import per_token_loss

VOCAB, CODES, T, N = 32, 16, 3, 4


def toy_samples(n: int, seed: int = 0, no_answer: tuple[int, ...] = (1,)) -> list[RolloutSample]:
    """Consistent synthetic samples: ids inside the toy vocab, advantages of both signs, one sample without answer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = 0 if i in no_answer else int(rng.integers(2, 6))
        out.append(RolloutSample(
            step=0, prompt_index=i // 3, sample_index=i % 3, concept="bo", category="animal", task_kind="visual",
            mmu_input_ids=rng.integers(0, VOCAB, 5).astype(np.int64),
            answer_ids=rng.integers(0, VOCAB, m).astype(np.int64),
            answer_logps=(-rng.random(m) * 3).astype(np.float32), answer_text="x", prompt_text="A photo of <bo>.",
            prompt_cut=False, t2i_input_ids=np.zeros(8, np.int64), uncond_input_ids=np.zeros(8, np.int64),
            states=rng.integers(0, VOCAB, (T, N)).astype(np.int64),
            chosen=rng.integers(0, CODES, (T, N)).astype(np.int64),
            image_logps=(-rng.random((T, N)) * 3).astype(np.float32), final_ids=np.zeros(N, np.int64),
            image=np.zeros((4, 4, 3), np.uint8), screen_score=0.5, attempts=1, reward=float(rng.random()),
            advantage=float(rng.normal())).validate())
    return out


def full_loss(policy: torch.nn.Module, reference: torch.nn.Module, samples, obj: ObjectiveConfig) -> torch.Tensor:
    """The D5 step loss computed directly on whole trajectories (independent of the unit split)."""
    S = len(samples)
    total = torch.zeros(())
    for s in samples:
        a = torch.tensor([[s.advantage]])
        st, ch = torch.as_tensor(s.states), torch.as_tensor(s.chosen)
        logp = ToyBackend.image_logp(policy, st, ch).reshape(1, -1)
        with torch.no_grad():
            ref = ToyBackend.image_logp(reference, st, ch).reshape(1, -1)
        total = total + obj.alpha_gen * per_token_loss(logp, None, ref, a, obj)["loss"].sum() / (T * N * S)
        if s.answer_ids.shape[0] and obj.alpha_und > 0:
            p, ans = torch.as_tensor(s.mmu_input_ids), torch.as_tensor(s.answer_ids)
            logp = ToyBackend.answer_logp(policy, p, ans)[None]
            with torch.no_grad():
                ref = ToyBackend.answer_logp(reference, p, ans)[None]
            total = total + obj.alpha_und * per_token_loss(logp, None, ref, a, obj)["loss"].sum() / (
                obj.max_answer_tokens * S)
    return total


def reference_grads(state: dict, ref_state: dict, samples, obj: ObjectiveConfig) -> tuple[float, dict]:
    """Single-process loss value and gradient of the full loss at weights ``state`` (reference ``ref_state``)."""
    b = ToyBackend(obj)
    b.module.load_state_dict(state)
    b.reference.load_state_dict(ref_state)
    loss = full_loss(b.module, b.reference, samples, obj)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in b.module.named_parameters()}


# -- fast, no Ray ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_schedule_is_even_kind_aligned_and_complete(world):
    samples = toy_samples(5)
    plan = schedule_units(samples, world, alpha_und=0.4)
    assert len({len(p) for p in plan}) == 1
    for k in range(len(plan[0])):
        assert len({plan[r][k].kind for r in range(world)}) == 1, "unit k must be the same kind on every rank"
    real = sorted((u.sample, u.kind, u.step) for p in plan for u in p if u.weight > 0)
    image, answer = build_units(samples, 0.4)
    assert real == sorted((u.sample, u.kind, u.step) for u in image + answer)
    assert len(answer) == 4 and len(image) == 5 * T
    assert sum(u.weight for p in plan for u in p) == len(real)
    assert not build_units(samples, 0.0)[1], "alpha_und = 0 → no answer units"


def test_unit_losses_sum_to_the_d5_loss_and_its_gradient():
    obj = ObjectiveConfig.tiny()
    samples = toy_samples(4)
    b = ToyBackend(obj)
    with torch.no_grad():  # make the reference differ so the KL term has a gradient
        for p in b.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    units = [u for r in schedule_units(samples, 1, obj.alpha_und) for u in r]
    sums = run_units(b.module, lambda loss: loss.backward(), b, samples, units, world_size=1)
    grads = {n: p.grad.clone() for n, p in b.module.named_parameters()}
    loss, want = reference_grads(b.module.state_dict(), b.reference.state_dict(), samples, obj)
    assert sums["loss"] == pytest.approx(loss, rel=1e-5)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-5, atol=1e-7)
    assert sums["units"] == len(units) and sums["image_tokens"] == 4 * T * N


def test_padding_units_contribute_nothing():
    obj = ObjectiveConfig.tiny()
    samples = toy_samples(2)
    b = ToyBackend(obj)
    sums = run_units(b.module, lambda loss: loss.backward(), b, samples, [ReplayUnit(0, "image", 1, 0.0)], 2)
    assert sums["units"] == 0 and sums["loss"] == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in b.module.parameters() if p.grad is not None)


def test_deepspeed_config():
    cfg = deepspeed_config(LearnerConfig(), on_gpu=False)
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["data_types"]["grad_accum_dtype"] == "fp32"
    assert cfg["bf16"]["enabled"] is False and deepspeed_config(LearnerConfig(), on_gpu=True)["bf16"]["enabled"]
    with pytest.raises(ValueError, match="zero_stage"):
        LearnerConfig(zero_stage=3).validate()
    with pytest.raises(ValueError, match="grad_accum_dtype"):
        deepspeed_config(LearnerConfig(zero_stage=0), on_gpu=True)


# -- Ray + DeepSpeed -------------------------------------------------------------------------------------------


def toy_cfg(**learner) -> SimpleNamespace:
    """A TrainConfig-shaped namespace with what LearnerGroup + ToyBackend read."""
    lc = LearnerConfig.tiny()
    for k, v in learner.items():
        setattr(lc, k, v)
    return SimpleNamespace(learner=lc, objective=ObjectiveConfig.tiny(), sync=SyncConfig.tiny())


def assert_ranks_identical(group) -> dict:
    sds = group.state_dicts()
    for sd in sds[1:]:
        for k in sds[0]:
            assert torch.equal(sd[k], sds[0][k]), f"ranks differ in {k}"
    return sds[0]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_two_rank_gradient_equals_single_process_gradient(ray_cluster, zero_stage):
    """SGD lr=1, no clip: the update is exactly −(reduced gradient). Two steps (2nd has a live KL gradient)."""
    from actors.learner.group import LearnerGroup

    cfg = toy_cfg(optimizer="sgd", lr=1.0, grad_clip=0.0, weight_decay=0.0, zero_stage=zero_stage,
                  num_cpus_per_rank=0.5)
    t0 = time.perf_counter()
    group = LearnerGroup(cfg, backend_factory=ToyBackend.factory)
    try:
        init = assert_ranks_identical(group)
        before = init
        for step in range(2):
            samples = toy_samples(5, seed=step)  # 15 image units + 4 answer units over 2 ranks → padding on both
            loss, want = reference_grads(before, init, samples, cfg.objective)
            metrics = group.train_step(samples)
            after = assert_ranks_identical(group)
            for n in want:
                torch.testing.assert_close(before[n] - after[n], want[n], rtol=1e-4, atol=1e-6)
            assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
            gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in want.values())))
            assert metrics["grad_norm"] == pytest.approx(gnorm, rel=1e-4)
            before = after
        print(f"2-rank gradient test (ZeRO-{zero_stage}) wall {time.perf_counter() - t0:.1f}s")
    finally:
        group.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1])  # BF16_Optimizer path (fp32 accumulation buffer)
def test_bf16_two_rank_gradient_norm_matches_fp32_reference(ray_cluster, zero_stage):
    """bf16 weights, fp32 gradient accumulation: DeepSpeed's reduced grad norm = the fp32 single-process one."""
    from actors.learner.group import LearnerGroup

    cfg = toy_cfg(dtype="bfloat16", zero_stage=zero_stage, optimizer="sgd", lr=1.0, grad_clip=0.0,
                  weight_decay=0.0, num_cpus_per_rank=0.5)
    group = LearnerGroup(cfg, backend_factory=ToyBackend.factory)
    try:
        before = {k: v.float() for k, v in assert_ranks_identical(group).items()}
        samples = toy_samples(5)
        _, want = reference_grads(before, before, samples, cfg.objective)
        m = group.train_step(samples)
        assert_ranks_identical(group)
        gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in want.values())))
        assert m["grad_norm"] == pytest.approx(gnorm, rel=5e-3)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_adamw_ranks_identical_every_step_metrics_and_checkpoint(ray_cluster, tmp_path):
    from actors.learner.group import LearnerGroup

    cfg = toy_cfg(lr=1e-2, num_cpus_per_rank=0.5)
    group = LearnerGroup(cfg, backend_factory=functools.partial(ToyBackend.factory, seed=3))
    try:
        init = assert_ranks_identical(group)
        for step in range(3):
            m = group.train_step(toy_samples(4, seed=10 + step))
            now = assert_ranks_identical(group)
            for key in ("loss", "kl", "clip_frac", "grad_norm", "logp_mismatch_image", "logp_mismatch_answer",
                        "time_s"):
                assert np.isfinite(m[key]), key
            assert m["grad_norm"] > 0 and m["logp_mismatch_image"] > 0 and m["units"] == 4 * T + 3
        assert any(not torch.equal(init[k], now[k]) for k in init), "AdamW step did not move the weights"
        assert m["kl"] > 0
        # checkpoint round trip restores weights *and* optimizer state: the next step replays bit for bit
        group.save_checkpoint(str(tmp_path / "ckpt"))
        nxt = toy_samples(4, seed=20)
        group.train_step(nxt)
        want = group.state_dict_rank0()
        group.load_checkpoint(str(tmp_path / "ckpt"))
        assert all(torch.equal(group.state_dict_rank0()[k], now[k]) for k in now)
        group.train_step(nxt)
        got = assert_ranks_identical(group)
        assert all(torch.equal(got[k], want[k]) for k in want)
        out = group.export_final(str(tmp_path / "final"))
        assert out.endswith("model.safetensors")
    finally:
        group.shutdown()


@pytest.mark.slow
def test_placement_more_cpus_than_cluster_is_a_clear_error(ray_cluster):
    from actors.cluster.placement import PlacementError, RolePlacement, RoleSpec
    from configs.placement import PlacementConfig

    roles = [RoleSpec("learner", 2, 1.0, 0.0), RoleSpec("rollout", 3, 64.0, 0.0)]
    with pytest.raises(PlacementError, match=r"role 'rollout' needs 3 × \{CPU: 64.*192 CPU.*cluster has 4 CPU"):
        RolePlacement(roles=roles, placement=PlacementConfig.tiny())
    with pytest.raises(PlacementError, match=r"role 'learner'.*GPU"):
        RolePlacement(roles=[RoleSpec("learner", 2, 0.5, 1.0)], placement=PlacementConfig.tiny())
    with pytest.raises(PlacementError, match="together need 5 CPU"):
        RolePlacement(roles=[RoleSpec("learner", 2, 1.5, 0.0), RoleSpec("rollout", 2, 1.0, 0.0)],
                      placement=PlacementConfig(layout="colocated", ready_timeout_s=30))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["split", "colocated"])
def test_placement_layouts_schedule_actors(ray_cluster, layout):
    import ray

    from actors.cluster.placement import RolePlacement, RoleSpec
    from configs.placement import PlacementConfig

    roles = [RoleSpec("learner", 2, 0.25, 0.0), RoleSpec("rollout", 3, 0.25, 0.0)]
    pl = RolePlacement(roles=roles, placement=PlacementConfig(layout=layout, ready_timeout_s=30))
    try:
        @ray.remote
        def where() -> str:
            return ray.get_runtime_context().get_placement_group_id()

        got = ray.get([where.options(**pl.learner_options(i)).remote() for i in range(2)]
                      + [where.options(**pl.rollout_options(j)).remote() for j in range(3)])
        ids = {name: pg.id.hex() for name, pg in pl.groups.items()}
        if layout == "split":
            assert got[:2] == [ids["learner"]] * 2 and got[2:] == [ids["rollout"]] * 3
        else:
            assert set(got) == {ids["colocated"]} and len(pl.plan.bundles["colocated"]) == 2
            assert pl.plan.bundles["colocated"][0]["CPU"] == pytest.approx(0.25 + 2 * 0.25)
    finally:
        pl.remove()


# -- the real tiny Show-o ----------------------------------------------------------------------------------------


def showo_setup(timesteps: int = 3, max_answer: int = 6):
    """Tiny Show-o policy, sampler config and objective (L_text = the answer budget)."""
    from backbone.build import ConceptSpec, build_policy
    from backbone.config import ModelConfig, SamplerConfig

    concepts = [ConceptSpec("bo", "dog")]
    policy = build_policy(ModelConfig.tiny(), concepts)
    return policy, concepts, SamplerConfig(timesteps=timesteps, guidance_scale=2.0), ObjectiveConfig(
        max_answer_tokens=max_answer)


def showo_samples(policy, sampler_cfg, n: int, max_answer: int = 6, seed: int = 0) -> list[RolloutSample]:
    """Real rollouts of the tiny policy (MaskGIT trajectory + sampled answer) as RolloutSamples."""
    from backbone.answer import generate_answers
    from backbone.maskgit import MaskGITSampler
    from backbone.prompts import build_mmu_inputs, build_t2i_inputs

    tok, c = policy.tok, policy.concepts["bo"]
    out = []
    for i in range(n):
        t2i = build_t2i_inputs(tok, [f"A photo of {c.concept_str} number {i}."], policy.vq.num_tokens,
                               max_text_len=16)
        with torch.no_grad():
            sampler = MaskGITSampler(policy.model, tok, sampler_cfg)
            state = sampler.run(sampler.start(t2i, [torch.Generator().manual_seed(seed * 100 + i)]))
            tr = state.trajectory
            mmu = build_mmu_inputs(tok, tr.final_ids, [f"What is {c.concept_str} doing?"])
            ans = generate_answers(policy.model, tok, mmu, max_new_tokens=max_answer,
                                   generators=[torch.Generator().manual_seed(seed * 100 + 50 + i)])
        keep = ans.mask[0]
        out.append(RolloutSample(
            step=0, prompt_index=0, sample_index=i, concept="bo", category="animal", task_kind="visual",
            mmu_input_ids=mmu.input_ids[0].numpy().astype(np.int64), answer_ids=ans.ids[0][keep].numpy(),
            answer_logps=ans.logps[0][keep].numpy().astype(np.float32), answer_text=ans.texts[0], prompt_text="",
            prompt_cut=False, t2i_input_ids=t2i.input_ids[0].numpy(),
            uncond_input_ids=t2i.uncond_input_ids[0].numpy(), states=tr.states[0].numpy(),
            chosen=tr.chosen[0].numpy(), image_logps=tr.logps[0].numpy().astype(np.float32),
            final_ids=tr.final_ids[0].numpy(), image=np.zeros((8, 8, 3), np.uint8), screen_score=0.0, attempts=1,
            advantage=0.5 if i % 2 == 0 else -0.5).validate())
    return out


def test_showo_replay_reproduces_rollout_logps_and_d5_loss():
    from actors.learner.step import ShowoBackend

    policy, _, scfg, obj = showo_setup()
    samples = showo_samples(policy, scfg, 2)
    b = ShowoBackend(policy, obj, scfg.guidance_scale)
    units = schedule_units(samples, 1, obj.alpha_und)[0]
    sums = run_units(b.module, lambda loss: loss.backward(), b, samples, units, 1)
    assert sums["image_absdiff"] / sums["image_tokens"] < 1e-5, "replay must reproduce the rollout's image log-probs"
    assert sums["answer_absdiff"] / max(sums["answer_tokens"], 1) < 1e-5
    # ratio 1, KL 0 at the reference: ℓ = −A per token → loss = mean_s −A_s (α_gen + α_und·M_s/L)
    want = sum(-s.advantage * (obj.alpha_gen + obj.alpha_und * len(s.answer_ids) / obj.max_answer_tokens)
               for s in samples) / len(samples)
    assert sums["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert all(p.grad is not None for p in b.module.parameters())


def test_showo_concept_rows_only_touch_concept_rows():
    from actors.learner.step import ShowoBackend

    policy, _, scfg, obj = showo_setup(timesteps=2)
    samples = showo_samples(policy, scfg, 1)
    b = ShowoBackend(policy, obj, scfg.guidance_scale, trainable="concept_rows")
    run_units(b.module, lambda loss: loss.backward(), b, samples, schedule_units(samples, 1, 0.4)[0], 1)
    trainable = [n for n, p in b.module.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(b.row_params)
    rows = torch.tensor(b.row_ids)
    for n, p in b.module.named_parameters():
        if p.requires_grad:
            other = torch.ones(p.shape[0], dtype=torch.bool)
            other[rows] = False
            assert float(p.grad[other].abs().sum()) == 0.0 and float(p.grad[rows].abs().sum()) > 0, n
    assert all(p.requires_grad for p in b.reference.parameters()) is False


@pytest.mark.slow
def test_showo_train_step_on_two_ranks(ray_cluster, tmp_path):
    from actors.learner.group import LearnerGroup
    from actors.learner.step import make_showo_backend

    policy, concepts, scfg, obj = showo_setup()
    samples = showo_samples(policy, scfg, 3)
    lc = LearnerConfig.tiny()
    lc.lr, lc.num_cpus_per_rank = 1e-3, 0.5
    cfg = SimpleNamespace(learner=lc, objective=obj, sync=SyncConfig.tiny(), model=policy_cfg(), sampler=scfg,
                          rollout=SimpleNamespace(answer_temperature=1.0, answer_top_k=None))
    t0 = time.perf_counter()
    group = LearnerGroup(cfg, backend_factory=functools.partial(make_showo_backend, concepts=concepts))
    try:
        init = assert_ranks_identical(group)
        assert all(torch.equal(init[k], v) for k, v in policy.model.state_dict().items()), "same cfg → same init"
        m1 = group.train_step(samples)
        after = assert_ranks_identical(group)
        assert m1["logp_mismatch_image"] < 1e-5 and m1["logp_mismatch_answer"] < 1e-5
        assert m1["units"] == 3 * scfg.timesteps + sum(len(s.answer_ids) > 0 for s in samples)
        assert m1["grad_norm"] > 0 and m1["kl"] == 0.0
        assert any(not torch.equal(init[k], after[k]) for k in init)
        m2 = group.train_step(samples)  # off the reference now: KL > 0, rollout log-probs no longer match
        assert_ranks_identical(group)
        assert m2["kl"] > 0 and m2["logp_mismatch_image"] > 1e-5
        out = group.export_final(str(tmp_path / "final"))
        assert (tmp_path / "final" / "pytorch_model.safetensors").is_file() and out == str(tmp_path / "final")
        assert (tmp_path / "final" / "concepts" / "bo" / "epoch_0_embed.pt").is_file()
        print(f"tiny Show-o 2-rank: setup+2 steps {time.perf_counter() - t0:.1f}s, step {m2['time_s']:.2f}s")
    finally:
        group.shutdown()


def policy_cfg():
    """The ModelConfig used by showo_setup."""
    from backbone.config import ModelConfig

    return ModelConfig.tiny()
