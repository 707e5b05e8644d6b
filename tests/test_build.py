"""build_policy: tiny preset, determinism across processes, explicit errors, real-weight and concept-checkpoint paths."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbone.build import ConceptSpec, build_policy
from backbone.checkpoint import save_showo_state_dict
from backbone.concepts import save_concept_checkpoint
from backbone.config import ModelConfig
from backbone.phi import ShowoPhi
from backbone.prompts import build_t2i_inputs, t2i_attention_mask

REPO = Path(__file__).resolve().parents[1]
SPECS = [ConceptSpec("bo", "dog"), ConceptSpec("mam", "cat")]


def _digest(policy) -> str:
    h = hashlib.sha256()
    for k, v in sorted(policy.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().numpy().tobytes())
    for k, v in sorted(policy.vq.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_tiny_policy_shapes_and_forward():
    p = build_policy(ModelConfig.tiny(), SPECS)
    tok, m = p.tok, p.model
    assert p.vq.codebook_size == tok.codebook_size == 1024 and p.vq.num_tokens == 64
    assert m.config.vocab_size == tok.vocab_size == m.lm_head.bias.shape[0] == p.phi_config.vocab_size
    assert m.config.hidden_size == 64 and m.config.num_hidden_layers == 2
    bo, mam = p.concepts["bo"], p.concepts["mam"]
    assert len(bo.all_ids) == 25 and bo.token_strs[0] == "<token_0>" and mam.token_strs[0] == "<mam_token_0>"
    assert mam.concept_id == bo.all_ids[-1] + 1 and tok.image_offset == mam.all_ids[-1] + 1
    assert p.concept_source == {"bo": "init", "mam": "init"}
    t2i = build_t2i_inputs(tok, [f"A photo of {bo.tokens_text()} {bo.concept_str}."], p.vq.num_tokens)
    with torch.no_grad():
        out = m(t2i.input_ids, t2i_attention_mask(t2i.input_ids, tok), logits_positions=t2i.image_slice,
                logits_rows=tok.image_rows)
    assert out.logits.shape == (1, 64, 1024) and torch.isfinite(out.logits).all()


def test_same_config_same_weights_across_processes_and_order():
    state = torch.get_rng_state()
    a = build_policy(ModelConfig.tiny(), SPECS)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    b = build_policy(ModelConfig.tiny(), list(reversed(SPECS)))
    assert _digest(a) == _digest(b) and a.concepts["mam"].all_ids == b.concepts["mam"].all_ids
    code = ("import hashlib, torch; torch.manual_seed(123); from backbone.build import *; "
            "from tests.test_build import _digest, SPECS; print(_digest(build_policy(ModelConfig.tiny(), SPECS)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                         env={"PATH": "", "PYTHONHASHSEED": "7", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == _digest(a)
    c = build_policy(ModelConfig(preset="tiny", random_init=True, seed=1), SPECS)
    assert _digest(c) != _digest(a)


def test_missing_sources_are_listed():
    with pytest.raises(ValueError) as e:
        build_policy(ModelConfig(), SPECS)
    msg = str(e.value)
    assert "tokenizer_path" in msg and "showo_path" in msg and "magvit_path" in msg and "random_init" in msg
    with pytest.raises(ValueError, match="showo_path"):
        build_policy(ModelConfig(preset="tiny", magvit_path=None, random_init=False), SPECS)
    with pytest.raises(FileNotFoundError) as e:
        build_policy(ModelConfig(preset="tiny", random_init=True, showo_path="/nonexistent/showo",
                                 magvit_path="/nonexistent/magvit"), SPECS)
    assert "/nonexistent/showo" in str(e.value) and "/nonexistent/magvit" in str(e.value)
    with pytest.raises(ValueError, match="preset"):
        build_policy(ModelConfig(preset="huge", random_init=True))
    with pytest.raises(ValueError, match="concept_checkpoint_epoch"):
        build_policy(ModelConfig(preset="tiny", random_init=True, concept_checkpoint_dir="/x"))


def test_loads_showo_weights_then_surgery_then_concept_checkpoint(tmp_path):
    """The real-preset order on tiny shapes: pre-concept Show-o file -> surgery -> concept rows from a checkpoint."""
    base = build_policy(ModelConfig.tiny(), [])  # no concepts: the Show-o vocab
    torch.manual_seed(5)
    donor = ShowoPhi(base.model.config)
    (tmp_path / "showo").mkdir()
    save_showo_state_dict(donor, tmp_path / "showo")
    trained = build_policy(ModelConfig.tiny(), SPECS[:1])
    with torch.no_grad():
        trained.model.model.embed_tokens.weight[trained.concepts["bo"].all_ids] += 1.0
    save_concept_checkpoint(trained.model, trained.concepts["bo"], tmp_path / "ckpt" / "bo", 15)

    cfg = ModelConfig(preset="tiny", random_init=True, showo_path=str(tmp_path / "showo"),
                      concept_checkpoint_dir=str(tmp_path / "ckpt"), concept_checkpoint_epoch=15)
    p = build_policy(cfg, SPECS[:1])
    ct = p.concepts["bo"]
    off, K = ct.concept_id, len(ct.all_ids)
    emb, d_emb = p.model.model.embed_tokens.weight, donor.model.embed_tokens.weight
    assert torch.equal(emb[:off], d_emb[:off]) and torch.equal(emb[off + K:], d_emb[off:])
    assert torch.equal(p.model.lm_head.bias[off + K:], donor.lm_head.bias[off:])
    assert torch.equal(emb[ct.all_ids], trained.model.model.embed_tokens.weight[ct.all_ids])
    assert p.concept_source["bo"].startswith("checkpoint:")
    for k, v in donor.state_dict().items():
        if k not in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            assert torch.equal(p.model.state_dict()[k], v), k
    # "{concept}" placeholder and a wrong epoch
    cfg2 = ModelConfig(preset="tiny", random_init=True, concept_checkpoint_dir=str(tmp_path / "ckpt" / "{concept}"),
                       concept_checkpoint_epoch=3)
    with pytest.raises(FileNotFoundError, match="epoch_3_embed.pt"):
        build_policy(cfg2, SPECS[:1])


def test_bf16_dtype():
    p = build_policy(ModelConfig(preset="tiny", random_init=True, dtype="bfloat16"), SPECS[:1])
    assert p.model.dtype == torch.bfloat16
    ref = build_policy(ModelConfig.tiny(), SPECS[:1])
    torch.testing.assert_close(p.model.lm_head.weight.float(), ref.model.lm_head.weight.to(torch.bfloat16).float())
