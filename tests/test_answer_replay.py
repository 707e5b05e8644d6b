"""Answer generation (KV cache, top-k, eot stop) and learner-side log-prob replay (images and answers)."""
from __future__ import annotations

import copy

import pytest
import torch

from backbone.answer import answer_mask, extend_mask, generate_answers, token_logprobs_dist
from backbone.config import SamplerConfig
from backbone.maskgit import MaskGITSampler, make_t2i_batch
from backbone.replay import PrefixKV, answer_logprobs, image_step_logprobs, newly_unmasked

N_IMG = 16
PROMPTS = ["a photo of a dog", "a red car on a street", "a cat"]
QUESTIONS = ["what is in the photo?", "is it red?", "describe the dog in the park in a few words"]


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def tiny():
    from backbone.phi import ShowoPhi, ShowoPhiConfig
    from backbone.tokenizer import ShowoTokenizer

    tok = ShowoTokenizer.build_for_tests(codebook_size=128)
    torch.manual_seed(0)
    model = ShowoPhi(ShowoPhiConfig.tiny(vocab_size=tok.vocab_size)).eval()
    # a model that ends answers early: eot gets a large bias (exercises the per-sample stop)
    stopper = copy.deepcopy(model)
    with torch.no_grad():
        stopper.lm_head.bias[tok.eot_id] = 6.5
    return model, stopper, tok


def mmu(tok, index=None):
    from backbone.prompts import build_mmu_inputs

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, tok.codebook_size, (len(QUESTIONS), N_IMG), generator=g)
    index = list(range(len(QUESTIONS))) if index is None else index
    return build_mmu_inputs(tok, img[index], [QUESTIONS[i] for i in index])


# ------------------------------------------------------------------------------------------- answers
def test_extend_mask_and_answer_mask():
    pm = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.bool)[None, None]
    pm[0, 0, 0, 0] = True
    m = extend_mask(pm, 2)
    assert m.shape == (1, 1, 5, 5)
    assert m[0, 0, 3].tolist() == [False, True, True, True, False]
    assert m[0, 0, 4].tolist() == [False, True, True, True, True]
    assert not m[0, 0, :3, 3:].any()
    ids = torch.tensor([[5, 7, 9, 9], [9, 9, 9, 9], [1, 2, 3, 4]])
    assert answer_mask(ids, 9).tolist() == [[True, True, True, False], [True, False, False, False],
                                            [True, True, True, True]]


def test_top_k_distribution():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    lp = token_logprobs_dist(logits, 1.0, top_k=2)
    assert torch.isinf(lp[0, [1, 3]]).all()
    assert torch.allclose(lp[0, [0, 2]].exp().sum(), torch.tensor(1.0))
    assert torch.allclose(token_logprobs_dist(logits, 2.0), torch.log_softmax(logits / 2, -1))


@pytest.mark.parametrize("top_k", [None, 5])
def test_generation_logps_match_teacher_forced(tiny, top_k):
    model, stopper, tok = tiny
    for m in (model, stopper):
        ans = generate_answers(m, tok, mmu(tok), max_new_tokens=12, top_k=top_k, generators=gens(1, 2, 3))
        assert ans.ids.shape == ans.logps.shape == ans.mask.shape and ans.ids.shape[0] == 3
        assert (ans.logps[~ans.mask] == 0).all() and torch.isfinite(ans.logps).all()
        tf = answer_logprobs(m, tok, mmu(tok), ans.ids, top_k=top_k)
        assert (tf - ans.logps).abs().max() <= 1e-5
        assert torch.equal(answer_mask(ans.ids, tok.eot_id), ans.mask)


def test_eot_stop_and_texts(tiny):
    _, stopper, tok = tiny
    ans = generate_answers(stopper, tok, mmu(tok), max_new_tokens=12, generators=gens(4, 5, 6))
    lens = ans.mask.sum(1)
    assert (lens < 12).any(), "the eot-biased model should stop some answers early"
    for i in range(3):
        n = int(lens[i])
        if n < 12 or ans.ids[i, n - 1] == tok.eot_id:
            assert ans.ids[i, n - 1] == tok.eot_id and (ans.ids[i, n:] == tok.eot_id).all()
        assert ans.texts[i] == tok.decode(ans.ids[i, :n][ans.ids[i, :n] != tok.eot_id].tolist())


def test_kv_cache_equals_no_cache_and_seeds(tiny):
    model, stopper, tok = tiny
    for m in (model, stopper):
        a = generate_answers(m, tok, mmu(tok), max_new_tokens=10, top_k=20, generators=gens(7, 8, 9))
        b = generate_answers(m, tok, mmu(tok), max_new_tokens=10, top_k=20, generators=gens(7, 8, 9),
                             use_cache=False)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
        assert (a.logps - b.logps).abs().max() <= 1e-5
    g1 = generate_answers(model, tok, mmu(tok), max_new_tokens=8, greedy=True)
    g2 = generate_answers(model, tok, mmu(tok), max_new_tokens=8, greedy=True, use_cache=False)
    assert torch.equal(g1.ids, g2.ids)
    # a sample alone (no padding) == the same sample inside a left-padded batch (pad-aware positions, own generator)
    full = generate_answers(model, tok, mmu(tok), max_new_tokens=10, generators=gens(7, 8, 9))
    alone = generate_answers(model, tok, mmu(tok, [1]), max_new_tokens=10, generators=gens(8))
    assert torch.equal(alone.ids[0], full.ids[1][: alone.ids.shape[1]])
    assert (alone.logps[0] - full.logps[1][: alone.ids.shape[1]]).abs().max() <= 1e-5


def test_answer_logprobs_gradients(tiny):
    model, _, tok = tiny
    ans = generate_answers(model, tok, mmu(tok), max_new_tokens=6, generators=gens(1, 2, 3))
    model.zero_grad()
    lp = answer_logprobs(model, tok, mmu(tok), ans.ids)
    (lp * ans.mask).sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


# ------------------------------------------------------------------------------------------- image replay
@pytest.fixture(scope="module")
def rollout(tiny):
    model, _, tok = tiny
    from backbone.prompts import build_t2i_inputs

    t2i = build_t2i_inputs(tok, PROMPTS, N_IMG)
    s = MaskGITSampler(model, tok, SamplerConfig(timesteps=8))
    return t2i, s.run(s.start(t2i, gens(1, 2, 3)))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_replay_matches_rollout_logps(tiny, rollout):
    model, _, tok = tiny
    t2i, st = rollout
    traj = st.trajectory
    batch = make_t2i_batch(tok, t2i, 5.0)
    with torch.no_grad():
        for k in range(traj.states.shape[1]):
            lp = image_step_logprobs(model, tok, batch, traj.states[:, k], traj.chosen[:, k], 5.0)
            assert lp.shape == (3, N_IMG) and (lp - traj.logps[:, k]).abs().max() <= 1e-5, k
    # T2IInputs directly works too
    with torch.no_grad():
        lp = image_step_logprobs(model, tok, t2i, traj.states[:, 2], traj.chosen[:, 2], 5.0)
    assert (lp - traj.logps[:, 2]).abs().max() <= 1e-5


def test_replay_gradients_through_both_branches(tiny, rollout):
    model, _, tok = tiny
    t2i, st = rollout
    traj = st.trajectory
    k = 3
    model.zero_grad()
    image_step_logprobs(model, tok, t2i, traj.states[:, k], traj.chosen[:, k], 5.0).sum().backward()
    cfg = _grads(model)
    model.zero_grad()
    image_step_logprobs(model, tok, t2i, traj.states[:, k], traj.chosen[:, k], 0.0).sum().backward()
    cond_only = _grads(model)
    model.zero_grad()
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert cfg[name].abs().sum() > 0, name
        assert not torch.allclose(cfg[name], cond_only[name]), name
    # the uncond prompt's text rows get gradient only through the uncond branch
    uncond_only_ids = set(t2i.uncond_input_ids[0, :t2i.text_len].tolist()) - set(
        t2i.input_ids[:, :t2i.text_len].flatten().tolist())
    for i in uncond_only_ids:
        assert cfg["model.embed_tokens.weight"][i].abs().sum() > 0
        assert cond_only.get("model.embed_tokens.weight")[i].abs().sum() == 0


def test_prefix_kv_leaves_give_the_same_gradients(tiny, rollout):
    model, _, tok = tiny
    t2i, st = rollout
    traj = st.trajectory
    batch = make_t2i_batch(tok, t2i, 5.0)
    steps = [0, 4, 7]
    model.zero_grad()
    for k in steps:  # reference: full sequence per step, backward per step
        image_step_logprobs(model, tok, batch, traj.states[:, k], traj.chosen[:, k], 5.0).sum().backward()
    ref = _grads(model)
    model.zero_grad()
    pk = PrefixKV.compute(model, batch)
    for k in steps:
        lp = image_step_logprobs(model, tok, batch, traj.states[:, k], traj.chosen[:, k], 5.0, prefix_kv=pk)
        assert (lp.detach() - traj.logps[:, k]).abs().max() <= 1e-5
        lp.sum().backward()
    pk.backward()
    got = _grads(model)
    model.zero_grad()
    assert ref.keys() == got.keys()
    for n in ref:   # float32 sums in another order: tolerance relative to each gradient's own scale
        scale = float(ref[n].abs().max())
        assert torch.allclose(ref[n], got[n], atol=1e-5 * max(scale, 1.0), rtol=1e-4), n


def test_newly_unmasked(tiny, rollout):
    _, _, tok = tiny
    _, st = rollout
    traj = st.trajectory
    nu = newly_unmasked(traj.states, tok.mask_id)
    assert nu.shape == traj.states.shape
    assert (nu.sum(1) == 1).all()  # every position becomes fixed exactly once
    assert (traj.states[nu] == tok.mask_id).all()
    first = nu[:, 0].sum(-1)
    assert (first == N_IMG - (traj.states[:, 1] == tok.mask_id).sum(-1)).all()
