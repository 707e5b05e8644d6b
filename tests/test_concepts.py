"""Concept-token surgery, UniCTokens checkpoints, concept_rows gradients, and Show-o safetensors loading."""
from __future__ import annotations

import pytest
import torch

from backbone.checkpoint import load_showo_state_dict, save_showo_state_dict
from backbone.concepts import (
    RowDecayAdamW,
    add_concept_tokens,
    concept_checkpoint_files,
    load_concept_checkpoint,
    restrict_grads_to_rows,
    save_concept_checkpoint,
    unfreeze,
)
from backbone.phi import ShowoPhi, ShowoPhiConfig
from backbone.tokenizer import ShowoTokenizer

CODES = 32


def _setup(seed: int = 0):
    tok = ShowoTokenizer.build_for_tests(codebook_size=CODES)
    torch.manual_seed(seed)
    model = ShowoPhi(ShowoPhiConfig.tiny(vocab_size=tok.vocab_size)).eval()
    return model, tok


def _image_logits(model, tok, codes):
    ids = codes + tok.image_offset
    L = ids.shape[1]
    mask = torch.ones(1, 1, L, L, dtype=torch.bool)
    with torch.no_grad():
        return model(ids, mask, logits_rows=slice(tok.image_offset, tok.mask_id + 1)).logits


def test_surgery_ids_and_row_shift():
    model, tok = _setup()
    off, V = tok.image_offset, tok.vocab_size
    old_e = model.model.embed_tokens.weight.detach().clone()
    old_w, old_b = model.lm_head.weight.detach().clone(), model.lm_head.bias.detach().clone()
    ct = add_concept_tokens(model, tok, "bo", 24, class_word="dog")
    K = 25
    assert ct.all_ids == list(range(off, off + K)) and tok.image_offset == off + K and tok.vocab_size == V + K
    assert model.model.embed_tokens.weight.shape == (V + K, 64) and model.lm_head.bias.shape == (V + K,)
    assert model.config.vocab_size == V + K and model.lm_head.out_features == V + K
    for new, old in ((model.model.embed_tokens.weight, old_e), (model.lm_head.weight, old_w),
                     (model.lm_head.bias, old_b)):
        assert torch.equal(new[:off], old[:off]) and torch.equal(new[off + K:], old[off:])
    dog = tok.encode("dog")
    torch.testing.assert_close(model.model.embed_tokens.weight[off], old_e[dog].mean(0))
    new_rows = model.model.embed_tokens.weight[off + 1:off + K]
    assert torch.isfinite(new_rows).all() and len({tuple(r.tolist()) for r in new_rows}) == K - 1  # distinct


def test_image_logits_unchanged_by_surgery():
    model, tok = _setup()
    codes = torch.randint(0, CODES, (1, 12), generator=torch.Generator().manual_seed(3))
    before = _image_logits(model, tok, codes)
    add_concept_tokens(model, tok, "bo", 6)
    add_concept_tokens(model, tok, "mam", 3)
    after = _image_logits(model, tok, codes)
    assert torch.equal(before, after)  # code columns and the mask column, bit-identical


def test_init_tensors_and_shape_errors():
    model, tok = _setup()
    e, w, b = torch.randn(4, 64), torch.randn(4, 64), torch.randn(4)
    ct = add_concept_tokens(model, tok, "bo", 3, init_embed=e, init_lm_head_weight=w, init_lm_head_bias=b)
    assert torch.equal(model.model.embed_tokens.weight[ct.all_ids], e)
    assert torch.equal(model.lm_head.bias[ct.all_ids], b)
    with pytest.raises(ValueError, match="init_embed"):
        add_concept_tokens(model, tok, "cat", 3, init_embed=torch.zeros(3, 64))


def test_concept_checkpoint_round_trip_and_errors(tmp_path):
    model, tok = _setup()
    ct = add_concept_tokens(model, tok, "bo", 4)
    with torch.no_grad():
        model.model.embed_tokens.weight[ct.all_ids] = torch.randn(5, 64)
        model.lm_head.bias[ct.all_ids] = torch.randn(5)
    files = save_concept_checkpoint(model, ct, tmp_path, 15)
    assert sorted(f.name for f in files.values()) == ["epoch_15_embed.pt", "epoch_15_lm_head_bias.pt",
                                                      "epoch_15_lm_head_weight.pt"]
    assert torch.load(files["embed"], weights_only=True).shape == (5, 64)
    other, tok2 = _setup(seed=1)
    ct2 = add_concept_tokens(other, tok2, "bo", 4)
    load_concept_checkpoint(other, ct2, tmp_path, 15)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        torch.testing.assert_close(other.state_dict()[name][ct2.all_ids], model.state_dict()[name][ct.all_ids],
                                   rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="epoch_5_embed.pt"):
        load_concept_checkpoint(other, ct2, tmp_path, 5)
    torch.save(torch.zeros(4, 64), concept_checkpoint_files(tmp_path, 15)["embed"])
    with pytest.raises(ValueError, match=r"epoch_15_embed\.pt.*\(4, 64\)"):
        load_concept_checkpoint(other, ct2, tmp_path, 15)
    torch.save({"x": torch.zeros(5, 64)}, concept_checkpoint_files(tmp_path, 15)["embed"])
    with pytest.raises(ValueError, match="expected a tensor"):
        load_concept_checkpoint(other, ct2, tmp_path, 15)


def _train_step(model, tok, opt):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (2, 16), generator=g)
    ids[:, :3] = torch.tensor(list(tok.concepts["bo"].all_ids[:3]))
    L = ids.shape[1]
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None]
    opt.zero_grad()
    model(ids, mask).logits.log_softmax(-1).mean().neg().backward()
    opt.step()


def test_concept_rows_only_those_rows_change_under_adamw_with_weight_decay():
    model, tok = _setup()
    ct = add_concept_tokens(model, tok, "bo", 4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = restrict_grads_to_rows(model, ct.all_ids)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"}
    opt = RowDecayAdamW(handle, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _train_step(model, tok, opt)
    rows = torch.tensor(ct.all_ids)
    other = torch.ones(tok.vocab_size, dtype=torch.bool)
    other[rows] = False
    after = model.state_dict()
    for k, v in after.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            assert torch.equal(v[other], before[k][other]), k
            assert not torch.equal(v[rows], before[k][rows]), k
        else:
            assert torch.equal(v, before[k]), k
    handle.remove()


def test_plain_adamw_weight_decay_would_move_other_rows():
    """Why RowDecayAdamW exists: decoupled decay moves zero-gradient rows."""
    model, tok = _setup()
    ct = add_concept_tokens(model, tok, "bo", 4)
    before = model.lm_head.weight.detach().clone()
    handle = restrict_grads_to_rows(model, ct.all_ids)
    opt = torch.optim.AdamW(handle.params, lr=1e-2, weight_decay=0.1)
    _train_step(model, tok, opt)
    assert not torch.equal(model.lm_head.weight[0], before[0])
    handle.remove()
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_row_decay_matches_adamw_on_the_rows():
    model, tok = _setup()
    ct = add_concept_tokens(model, tok, "bo", 4)
    ref = ShowoPhi(model.config)
    ref.load_state_dict(model.state_dict())
    h1 = restrict_grads_to_rows(model, ct.all_ids)
    h2 = restrict_grads_to_rows(ref, ct.all_ids)
    _train_step(model, tok, RowDecayAdamW(h1, lr=1e-2, weight_decay=0.1))
    _train_step(ref, tok, torch.optim.AdamW(h2.params, lr=1e-2, weight_decay=0.1))
    torch.testing.assert_close(model.lm_head.weight[ct.all_ids], ref.lm_head.weight[ct.all_ids])
    torch.testing.assert_close(model.model.embed_tokens.weight[ct.all_ids], ref.model.embed_tokens.weight[ct.all_ids])


# ------------------------------------------------------------------------------------------- Show-o safetensors


def test_showo_safetensors_round_trip_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = _setup()
    path = save_showo_state_dict(model, tmp_path)
    assert path.name == "pytorch_model.safetensors"
    sd = load_file(str(path))
    assert all(k.startswith("showo.model.") or k.startswith("showo.lm_head.") for k in sd)
    assert "showo.model.layers.1.self_attn.k_layernorm.bias" in sd
    other, _ = _setup(seed=7)
    assert load_showo_state_dict(other, tmp_path) == path
    for k, v in other.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # a synthetic Show-o file (written by hand, not by us) loads as is
    synth = {"showo." + k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    save_file(synth, str(tmp_path / "synthetic.safetensors"))
    load_showo_state_dict(other, tmp_path / "synthetic.safetensors")
    assert (other.lm_head.bias == 0.5).all()
    # wrong shape names the key and both shapes
    bad = dict(synth)
    bad["showo.model.layers.0.mlp.fc1.weight"] = torch.zeros(3, 64)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*showo\.model\.layers\.0\.mlp\.fc1\.weight.*\(3, 64\).*"
                                         r"\(256, 64\)"):
        load_showo_state_dict(other, tmp_path / "bad.safetensors")
    missing = {k: v for k, v in synth.items() if k != "showo.lm_head.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing key 'showo.lm_head.bias'"):
        load_showo_state_dict(other, tmp_path / "missing.safetensors")
    extra = dict(synth, **{"mm_projector.0.weight": torch.zeros(2, 2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected key 'mm_projector.0.weight'"):
        load_showo_state_dict(other, tmp_path / "extra.safetensors")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_showo_state_dict(other, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_showo_state_dict(other, tmp_path / "empty")
    assert not list(tmp_path.glob(".*tmp*"))
