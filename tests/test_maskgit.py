"""MaskGIT sampler: Show-o's schedule/τ/re-mask math, per-sample randomness, pause/resume, prefix-K/V parity."""
from __future__ import annotations

import math

import pytest
import torch

from backbone.config import SamplerConfig
from backbone.maskgit import (
    MaskGITSampler,
    cfg_code_logits,
    mask_by_random_topk,
    maskgit_step,
    schedule_mask_len,
    schedule_table,
)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------- pure math
def test_real_schedule_numbers():
    table = schedule_table(50, 1024, tau0=1.0)
    assert table[0] == (1023, pytest.approx(0.98))
    assert table[9][0] == 973
    assert table[9][1] == pytest.approx(0.3054, abs=1e-3)
    assert table[19][0] == 828
    assert table[48][0] == 32
    assert table[49] == (1, 0.0)
    # the clamp: never fewer than 1, never more than unknown - 1
    assert int(schedule_mask_len(49, 50, 1024, torch.tensor(5))) == 1
    assert int(schedule_mask_len(0, 50, 1024, torch.tensor(3))) == 2


def test_tau_compounds():
    tau = 1.0
    for k, (_, t) in enumerate(schedule_table(50, 1024)):
        tau *= 1 - (k + 1) / 50
        assert t == pytest.approx(tau)
    assert schedule_table(50, 1024)[9][1] == pytest.approx(math.prod(1 - (k + 1) / 50 for k in range(10)))


def test_mask_by_random_topk_keeps_known_and_counts():
    torch.manual_seed(0)
    log_conf = torch.randn(3, 40).clamp(max=0)
    known = torch.zeros(3, 40, dtype=torch.bool)
    known[:, :7] = True
    mask_len = torch.tensor([5, 10, 32])
    m = mask_by_random_topk(mask_len, log_conf, known, 0.7, gens(1, 2, 3))
    assert not m[:, :7].any()
    assert m.sum(-1).tolist() == [5, 10, 32]
    alone = mask_by_random_topk(mask_len[1:2], log_conf[1:2], known[1:2], 0.7, gens(2))
    assert torch.equal(alone[0], m[1])


def test_step_math_on_plain_logits():
    torch.manual_seed(0)
    b, n, k, off, mask_id = 3, 16, 11, 100, 111
    logits = torch.randn(b, n, k) * 3
    cur = torch.full((b, n), mask_id)
    cur[:, :4] = off + torch.arange(4)
    res = maskgit_step(logits, cur, 3, 8, 0.5, gens(5, 6, 7), mask_id, off)
    assert torch.equal(res.chosen[:, :4], torch.arange(4).expand(b, 4))
    assert ((res.chosen >= 0) & (res.chosen < k)).all()
    expect_len = schedule_mask_len(3, 8, n, torch.full((b,), n - 4))
    assert torch.equal((res.next_ids == mask_id).sum(-1), expect_len)
    fixed = res.next_ids != mask_id
    assert torch.equal(res.next_ids[fixed], res.chosen[fixed] + off)
    ref = torch.log_softmax(logits, -1).gather(-1, res.chosen[..., None])[..., 0]
    assert torch.allclose(res.logps, ref)
    assert res.tau == pytest.approx(0.5 * (1 - 4 / 8))
    one = maskgit_step(logits[1:2], cur[1:2], 3, 8, 0.5, gens(6), mask_id, off)
    assert torch.equal(one.chosen[0], res.chosen[1]) and torch.equal(one.next_ids[0], res.next_ids[1])


# ------------------------------------------------------------------------------------------- tiny model
N_IMG = 16
PROMPTS = ["a photo of a dog", "a red car on a street", "a cat"]


@pytest.fixture(scope="module")
def tiny():
    from backbone.phi import ShowoPhi, ShowoPhiConfig
    from backbone.tokenizer import ShowoTokenizer

    tok = ShowoTokenizer.build_for_tests(codebook_size=128)
    torch.manual_seed(0)
    model = ShowoPhi(ShowoPhiConfig.tiny(vocab_size=tok.vocab_size)).eval()
    return model, tok


def t2i(tok, texts):
    from backbone.prompts import build_t2i_inputs

    return build_t2i_inputs(tok, texts, N_IMG)


def run(model, tok, texts, seeds, cfg=None, stop=None):
    s = MaskGITSampler(model, tok, cfg or SamplerConfig.tiny())
    return s, s.run(s.start(t2i(tok, texts), gens(*seeds)), stop_after_step=stop)


def test_schedule_followed_and_final_grid(tiny):
    model, tok = tiny
    _, st = run(model, tok, PROMPTS, [1, 2, 3])
    traj = st.trajectory
    T = SamplerConfig.tiny().timesteps
    assert st.done and traj.states.shape == (3, T, N_IMG) and traj.logps.dtype == torch.float32
    table = schedule_table(T, N_IMG)
    masked_before = (traj.states == tok.mask_id).sum(-1)  # [B,T]
    assert (masked_before[:, 0] == N_IMG).all()
    for k in range(1, T):
        assert (masked_before[:, k] == table[k - 1][0]).all(), k
    assert ((st.image_ids == tok.mask_id).sum(-1) == table[-1][0]).all()
    # once fixed, a token never changes; chosen keeps fixed codes
    for k in range(T):
        fixed = traj.states[:, k] != tok.mask_id
        assert torch.equal(traj.chosen[:, k][fixed], traj.states[:, k][fixed] - tok.image_offset)
    final = st.final_ids
    assert final is not None and ((final >= 0) & (final < tok.codebook_size)).all()
    assert torch.equal(final, traj.chosen[:, -1])
    assert torch.isfinite(traj.logps).all() and (traj.logps <= 0).all()


def test_same_seed_same_grid_and_batch_independence(tiny):
    model, tok = tiny
    _, a = run(model, tok, PROMPTS, [7, 8, 9])
    _, b = run(model, tok, PROMPTS, [7, 8, 9])
    assert torch.equal(a.final_ids, b.final_ids)
    _, alone = run(model, tok, PROMPTS[1:2], [8])
    assert torch.equal(alone.final_ids[0], a.final_ids[1])
    assert torch.equal(alone.trajectory.logps[0], a.trajectory.logps[1])
    _, other = run(model, tok, PROMPTS, [7, 99, 9])
    assert not torch.equal(other.final_ids[1], a.final_ids[1])


def test_pause_resume_bit_identical_and_preview(tiny):
    model, tok = tiny
    _, full = run(model, tok, PROMPTS, [4, 5, 6])
    s, st = run(model, tok, PROMPTS, [4, 5, 6], stop=5)
    assert st.step == 5 and not st.done and st.final_ids is None
    preview = s.preview_ids(st)
    assert ((preview >= 0) & (preview < tok.codebook_size)).all()
    assert (st.image_ids == tok.mask_id).any() and not torch.equal(preview + tok.image_offset, st.image_ids)
    assert torch.equal(preview, full.trajectory.chosen[:, 4])
    s.run(st)
    assert torch.equal(st.final_ids, full.final_ids)
    for name in ("states", "chosen", "logps"):
        assert torch.equal(getattr(st.trajectory, name), getattr(full.trajectory, name)), name
    # select(): continue a subset, same result as the uninterrupted batch
    s2, st2 = run(model, tok, PROMPTS, [4, 5, 6], stop=3)
    sub = s2.run(st2.select([2, 0]))
    assert torch.equal(sub.final_ids, full.final_ids[[2, 0]])
    with pytest.raises(ValueError):
        s2.preview_ids(s2.start(t2i(tok, PROMPTS[:1]), gens(1)))


def test_prefix_reuse_logits_match_full_recompute(tiny):
    model, tok = tiny
    s, st = run(model, tok, PROMPTS, [1, 2, 3])
    traj = st.trajectory
    with torch.no_grad():
        for k in (0, 3, SamplerConfig.tiny().timesteps - 1):
            fast = cfg_code_logits(model, tok, st.batch, traj.states[:, k], 5.0, prefix_kv=st.prefix_kv,
                                   block_mask=st.block_mask)
            slow = cfg_code_logits(model, tok, st.batch, traj.states[:, k], 5.0, prefix_kv=None)
            assert fast.shape == (3, N_IMG, tok.codebook_size)
            assert (fast - slow).abs().max() <= 1e-5
            # independent check: full-vocab logits, image slice, code columns, CFG by hand
            p = st.batch.prefix_len
            ids = st.batch.ids.clone()
            ids[:, p + 1:p + 1 + N_IMG] = traj.states[:, k].repeat(2, 1)
            full = model(ids, st.batch.mask).logits[:, p + 1:p + 1 + N_IMG, tok.image_offset:tok.mask_id]
            c, u = full.chunk(2)
            assert (fast - (6 * c - 5 * u)).abs().max() <= 1e-5
    # the sampler without prefix reuse gives the same trajectory
    _, slow_run = run(model, tok, PROMPTS, [1, 2, 3], cfg=SamplerConfig(timesteps=12, reuse_prefix_kv=False))
    assert torch.equal(slow_run.final_ids, st.final_ids)


def test_no_cfg_and_errors(tiny):
    model, tok = tiny
    _, st = run(model, tok, PROMPTS[:2], [1, 2], cfg=SamplerConfig(timesteps=4, guidance_scale=0.0))
    assert st.done and st.batch.ids.shape[0] == 2
    with pytest.raises(ValueError):
        MaskGITSampler(model, tok, SamplerConfig(schedule="linear"))
    with pytest.raises(ValueError):
        MaskGITSampler(model, tok, SamplerConfig.tiny()).start(t2i(tok, PROMPTS), gens(1))


def test_sampler_equals_straightforward_reference_loop(tiny):
    """The benchmark's reference (full recompute, full vocab, CFG branches one after the other, eager attention)."""
    from launch.bench.rollout import reference_generate

    model, tok = tiny
    inputs = t2i(tok, PROMPTS)
    ref = reference_generate(model, tok, inputs, gens(1, 2, 3), timesteps=12)
    _, st = run(model, tok, PROMPTS, [1, 2, 3])
    assert torch.equal(ref, st.final_ids)
