"""ShowoPhi against an independent reference (transformers' PhiForCausalLM with qk_layernorm=True).

transformers 5.24 ``PhiAttention.forward`` views q/k as ``[B, L, H, Dh]``, transposes to ``[B, H, L, Dh]`` and only
then applies ``q_layernorm`` / ``k_layernorm`` (``LayerNorm(hidden // heads)``), before the partial RoPE, i.e. per
head after the split, like Show-o's ``models/phi.py``. A 4-D mask passes through ``create_causal_mask`` unchanged, so
with ``attn_implementation="eager"`` it is added to the fp32 scores exactly as in Show-o.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from backbone.phi import PhiOutput, ShowoPhi, ShowoPhiConfig

VOCAB = 97


def _tiny_model(seed: int = 0) -> ShowoPhi:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ShowoPhiConfig.tiny(vocab_size=VOCAB), initializer_range=0.1)
    model = ShowoPhi(cfg)
    with torch.no_grad():  # make every LayerNorm and bias non-trivial so a misplaced LN would show
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def _omni_mask(lengths: list[int], total_text: int, n_img: int) -> torch.Tensor:
    """Bool [B,1,L,L]: left pads, causal text, bidirectional image block, no attention to pads."""
    L = total_text + n_img
    masks = []
    for n in lengths:
        pad = total_text - n
        m = torch.tril(torch.ones(L, L, dtype=torch.bool))
        m[total_text:, :] = True
        m[:, :pad] = False
        m[torch.arange(pad), torch.arange(pad)] = True  # pad rows keep self-attention
        masks.append(m)
    return torch.stack(masks)[:, None]


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def _hf_reference(model: ShowoPhi):
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_cfg = transformers.PhiConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        hidden_act="gelu_new", layer_norm_eps=c.layer_norm_eps, qk_layernorm=True, tie_word_embeddings=False,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                         "partial_rotary_factor": c.partial_rotary_factor})
    hf_cfg._attn_implementation = "eager"
    ref = transformers.PhiForCausalLM(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref


def test_configs():
    real = ShowoPhiConfig.real()
    assert (real.vocab_size, real.hidden_size, real.num_hidden_layers, real.num_attention_heads,
            real.intermediate_size) == (58498, 2048, 24, 32, 8192)
    assert (real.head_dim, real.rotary_dim) == (64, 32)
    tiny = ShowoPhiConfig.tiny(vocab_size=500)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.intermediate_size) == (
        64, 2, 4, 256)
    assert (tiny.head_dim, tiny.rotary_dim, tiny.vocab_size) == (16, 8, 500)


def test_state_dict_keys_are_showo_names():
    model = ShowoPhi(ShowoPhiConfig.tiny(vocab_size=VOCAB))
    sd = model.state_dict()
    layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
             "self_attn.q_layernorm", "self_attn.k_layernorm", "mlp.fc1", "mlp.fc2"]
    expected = {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias",
                "model.final_layernorm.weight", "model.final_layernorm.bias"}
    for i in range(2):
        for m in layer:
            expected |= {f"model.layers.{i}.{m}.weight", f"model.layers.{i}.{m}.bias"}
    assert set(sd) == expected
    assert sd["model.layers.0.self_attn.q_layernorm.weight"].shape == (16,)
    assert sd["lm_head.bias"].shape == (VOCAB,)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_matches_transformers_phi_with_qk_layernorm(mask_kind):
    model = _tiny_model()
    ref = _hf_reference(model)
    g = torch.Generator().manual_seed(1)
    text, n_img = 9, 6
    ids = torch.randint(0, VOCAB, (3, text + n_img), generator=g)
    bool_mask = _omni_mask([9, 5, 2], text, n_img)
    add_mask = _additive(bool_mask)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=add_mask, position_ids=torch.arange(ids.shape[1])[None]).logits
        got = model(ids, bool_mask if mask_kind == "bool" else add_mask).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = (got - want.float()).abs().max().item()
    print(f"max abs diff vs transformers PhiForCausalLM ({mask_kind} mask): {diff:.3e}")
    assert want.abs().max() > 0.5  # logits are not trivially small
    assert diff <= 1e-5


def test_int64_showo_style_mask_is_accepted():
    model = _tiny_model()
    ids = torch.randint(0, VOCAB, (2, 10))
    bool_mask = _omni_mask([6, 3], 6, 4)
    int_mask = torch.zeros(bool_mask.shape, dtype=torch.int64).masked_fill(~bool_mask, torch.iinfo(torch.int64).min)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, int_mask).logits, model(ids, bool_mask).logits)


def test_prefix_kv_reuse_equals_full_forward():
    model = _tiny_model()
    text, n_img = 8, 5
    ids = torch.randint(0, VOCAB, (2, text + n_img))
    mask = _omni_mask([8, 4], text, n_img)
    with torch.no_grad():
        full = model(ids, mask).logits
        pre = model(ids[:, :text], mask[:, :, :text, :text], use_cache=True, compute_logits=False)
        assert pre.logits is None
        assert len(pre.past_key_values) == 2 and pre.past_key_values[0][0].shape == (2, 4, text, 16)
        rest = model(ids[:, text:], mask[:, :, text:, :], past_key_values=pre.past_key_values, use_cache=True)
    torch.testing.assert_close(rest.logits, full[:, text:], atol=1e-5, rtol=1e-5)
    assert rest.past_key_values[0][0].shape == (2, 4, text + n_img, 16)
    # batch-1 prefix is broadcast over a batch (e.g. the same prompt for every sample of a group)
    with torch.no_grad():
        one = model(ids[:1, :text], mask[:1, :, :text, :text], use_cache=True, compute_logits=False)
        ids2 = torch.cat([ids[:1], ids[:1]])
        ids2[1, text:] = torch.randint(0, VOCAB, (n_img,))
        full2 = model(ids2, mask[:1]).logits
        rest2 = model(ids2[:, text:], mask[:1, :, text:, :], past_key_values=one.past_key_values)
    torch.testing.assert_close(rest2.logits, full2[:, text:], atol=1e-5, rtol=1e-5)


def test_gradient_flows_through_cached_kv():
    model = _tiny_model()
    text, n_img = 6, 4
    ids = torch.randint(0, VOCAB, (1, text + n_img))
    mask = _omni_mask([6], text, n_img)
    with torch.no_grad():
        pre = model(ids[:, :text], mask[:, :, :text, :text], use_cache=True, compute_logits=False)
    leaves = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in pre.past_key_values]
    out = model(ids[:, text:], mask[:, :, text:, :], past_key_values=leaves)
    out.logits.sum().backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k, _ in leaves)
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for _, v in leaves)


def test_logits_rows_and_positions_slice_the_full_logits():
    model = _tiny_model()
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = _omni_mask([7, 5], 7, 4)
    with torch.no_grad():
        full = model(ids, mask).logits
        part = model(ids, mask, logits_positions=slice(7, 10), logits_rows=slice(40, 96)).logits
        idx = model(ids, mask, logits_positions=torch.tensor([0, 8]), logits_rows=torch.tensor([3, 5, 90])).logits
    assert part.shape == (2, 3, 56)
    torch.testing.assert_close(part, full[:, 7:10, 40:96], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(idx, full[:, [0, 8]][:, :, [3, 5, 90]], atol=1e-6, rtol=1e-6)


def test_default_positions_and_explicit_positions_agree():
    model = _tiny_model()
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = _omni_mask([7, 3], 7, 0)
    with torch.no_grad():
        a = model(ids, mask).logits
        b = model(ids, mask, position_ids=torch.arange(7)[None].expand(2, 7)).logits
        c = model(ids, mask, position_ids=torch.arange(1, 8)).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_mask_is_required_and_checked():
    model = _tiny_model()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, None)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(2, 1, 5, 6, dtype=torch.bool))


def test_bf16_compute_returns_fp32_logits():
    model = _tiny_model().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 6))
    mask = _omni_mask([6], 6, 0)
    out = model(ids, _additive(mask))
    assert isinstance(out, PhiOutput)
    assert out.logits.dtype == torch.float32 and out.hidden_states.dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all()


def test_gradient_checkpointing_same_grads():
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = _omni_mask([5, 3], 5, 3)
    grads = []
    for ckpt in (False, True):
        model = _tiny_model().train()
        model.gradient_checkpointing = ckpt
        model(ids, mask).logits.square().mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
