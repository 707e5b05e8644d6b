"""MaskGIT sampler: Show-o's schedule/τ/re-mask math, per-sample randomness, pause/resume, prefix-K/V parity."""
from __future__ import annotations

import math

import pytest
import torch

from backbone.maskgit import (
    MaskGITSampler,
    SamplerConfig,
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
