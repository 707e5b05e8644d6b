"""learner.units_per_forward: packing keeps the D12 alignment, and the batched Show-o replay gives the unit-by-unit
gradient (tiny random-init Show-o, real rollout samples)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.learner.pack import pack_units
from actors.learner.step import ReplayUnit, make_showo_backend, run_units, schedule_units
from actors.rollout.engine import GroupRequest, RolloutEngine
from actors.rollout.scoring import local_scorer
from configs.schema import load_config
from rl.data.reader import load_concept_dataset


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_packs_align_across_ranks_and_cover_every_unit(world, k):
    from tests.test_learner import toy_samples

    plan = schedule_units(toy_samples(5), world, alpha_und=0.4)
    packs = [pack_units(p, k) for p in plan]
    assert len({len(p) for p in packs}) == 1, "every rank runs the same number of forward/backward calls"
    for j in range(len(packs[0])):
        assert len({(len(p[j]), p[j][0].kind) for p in packs}) == 1, "pack j has the same size and kind everywhere"
        assert all(len(p[j]) == 1 for p in packs if p[j][0].kind == "answer")
        assert all(len(p[j]) <= k for p in packs)
    assert [u for p in packs[0] for u in p] == plan[0]
    with pytest.raises(ValueError, match="units_per_forward"):
        pack_units(plan[0], 0)


@pytest.fixture(scope="module")
def showo_samples(sample_root):
    cfg = load_config("tiny_cpu", [f"data.root={sample_root}", "rollout.group_size=3", "sampler.timesteps=5",
                                   "dsog.enabled=false", "rollout.answer_max_new_tokens=6",
                                   "objective.kl_beta=0.05"])
    ds = load_concept_dataset(sample_root)
    torch.set_num_threads(1)
    backend = make_showo_backend(cfg, torch.device("cpu"))
    engine = RolloutEngine(cfg, backend.policy, ds, local_scorer(cfg, ds))
    samples = engine.generate_group(GroupRequest(step=0, prompt_index=0, concept="chelsea", threshold=None)).samples
    for i, s in enumerate(samples):   # advantages of both signs, so every unit has a gradient
        s.advantage = float((-1) ** i * (0.5 + 0.25 * i))
    with torch.no_grad():   # the policy drifts from the frozen reference: the KL term has a gradient too
        gen = torch.Generator().manual_seed(0)
        for p in backend.module.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    return backend, samples


def _grads(backend, samples, units, k):
    backend.module.zero_grad(set_to_none=True)
    backend.begin_step()
    sums = run_units(backend.module, lambda loss: loss.backward(), backend, samples, units, world_size=1,
                     units_per_forward=k)
    return sums, {n: p.grad.clone() for n, p in backend.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("world", [1, 2])
def test_batched_replay_gives_the_unit_by_unit_gradient(showo_samples, world):
    backend, samples = showo_samples
    units = schedule_units(samples, world, alpha_und=0.4)[0]   # rank 0's share (with a padding unit at world 2)
    if world == 2:
        units = units + [ReplayUnit(0, "image", 1, 0.0)]   # an explicit padding unit inside a pack
    one, g1 = _grads(backend, samples, units, 1)
    for k in (2, 4):
        packed, gk = _grads(backend, samples, units, k)
        assert packed["units"] == one["units"] and packed["image_tokens"] == one["image_tokens"]
        assert packed["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-9)
        assert packed["kl_sum"] == pytest.approx(one["kl_sum"], rel=1e-4, abs=1e-9)
        assert packed["image_absdiff"] == pytest.approx(one["image_absdiff"], rel=1e-5)
        assert g1.keys() == gk.keys() and len(g1) > 10
        for name in g1:
            torch.testing.assert_close(gk[name], g1[name], rtol=1e-4, atol=1e-7, msg=name)
    assert max(float(g.abs().max()) for g in g1.values()) > 0
    assert np.isfinite(one["loss"])
