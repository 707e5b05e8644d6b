"""ShowoTokenizer id layout + concept tokens, and the t2i / mmu layouts and masks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbone.prompts import (
    MMU_TEMPLATE,
    build_mmu_inputs,
    build_t2i_inputs,
    mmu_attention_mask,
    t2i_attention_mask,
    to_additive_mask,
)
from backbone.tokenizer import BUILTIN_CORPUS, ENDOFTEXT, SPECIAL_TOKENS, ShowoTokenizer, _train_bpe_json, _wrap_fast

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tok() -> ShowoTokenizer:
    return ShowoTokenizer.build_for_tests(codebook_size=64)


def _phi_sized_tokenizer(codebook_size: int = 8192) -> ShowoTokenizer:
    """A stand-in with phi-1.5's base length (50295) and ``<|endoftext|>`` at 50256 (no real phi files offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    while len(vocab) < 50256:
        vocab[f"w{len(vocab)}"] = len(vocab)
    vocab[ENDOFTEXT] = 50256
    while len(vocab) < 50295:
        vocab[f"ws{len(vocab)}"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    return ShowoTokenizer(hf=hf, codebook_size=codebook_size)


def test_phi_sized_ids_match_showo_and_unictokens():
    tok = _phi_sized_tokenizer()
    assert (tok.pad_id, tok.soi_id, tok.eoi_id, tok.sov_id, tok.eov_id, tok.t2i_id, tok.mmu_id, tok.t2v_id,
            tok.v2v_id, tok.lvg_id) == tuple(range(50295, 50305))
    assert tok.sot_id == tok.eot_id == tok.bos_id == tok.eos_id == 50256
    assert (tok.image_offset, tok.mask_id, tok.vocab_size) == (50305, 58497, 58498)
    c = tok.add_concept("bo", 24)
    assert c.concept_id == 50305 and c.token_ids == list(range(50306, 50330))
    assert c.concept_str == "<bo>" and c.token_strs[0] == "<token_0>" and c.token_strs[-1] == "<token_23>"
    assert (tok.image_offset, tok.mask_id, tok.vocab_size) == (50330, 58522, 58523)


def test_specials_contiguous_after_base_vocab_in_order(tok):
    base = tok.pad_id
    names = ["[PAD]", *SPECIAL_TOKENS]
    assert tok.hf.convert_tokens_to_ids(names) == list(range(base, base + 10))
    assert (tok.soi_id, tok.lvg_id) == (base + 1, base + 9)
    assert tok.image_offset == len(tok) == base + 10
    assert tok.mask_id == tok.image_offset + 64 and tok.vocab_size == tok.mask_id + 1
    assert tok.hf.convert_ids_to_tokens(tok.eot_id) == ENDOFTEXT and tok.sot_id == tok.eot_id
    assert tok.hf.padding_side == "left" and tok.hf.pad_token_id == tok.pad_id
    assert 600 <= base - 257 <= 1000  # merges of the builtin BPE


def test_builtin_bpe_is_deterministic_across_processes():
    code = ("from backbone.tokenizer import ShowoTokenizer; t = ShowoTokenizer.build_for_tests(); "
            "import hashlib; print(hashlib.md5(t.hf.backend_tokenizer.to_str().encode()).hexdigest(), "
            "t.encode('A photo of a grey cat on a red sofa.'))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""}, cwd=str(REPO)).stdout
            for s in (1, 2)}
    assert len(outs) == 1


def test_encode_decode_roundtrip_and_no_bos(tok):
    ids = tok.encode("A photo of a dog.")
    assert ids and ids[0] != tok.bos_id
    assert tok.decode(ids) == "A photo of a dog."
    assert tok.decode(ids + [tok.image_offset + 3, tok.mask_id]) == "A photo of a dog."


def test_concepts_move_image_offset_and_names(tok):
    off = tok.image_offset
    a = tok.add_concept("bo", 4)
    assert a.all_ids == list(range(off, off + 5)) and a.token_strs == [f"<token_{i}>" for i in range(4)]
    assert tok.image_offset == off + 5 and tok.mask_id == off + 5 + 64
    b = tok.add_concept("mam", 2)
    assert b.token_strs == ["<mam_token_0>", "<mam_token_1>"] and b.concept_id == off + 5
    assert tok.image_offset == off + 8
    ids = tok.encode(f"A photo of {a.tokens_text()} <bo>.")
    assert a.token_ids == ids[ids.index(a.token_ids[0]):][:4] and a.concept_id in ids
    with pytest.raises(ValueError, match="already"):
        tok.add_concept("bo", 1)


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="phi-1.5 tokenizer"):
        ShowoTokenizer.from_pretrained(str(tmp_path / "nope"))


def test_from_pretrained_local_dir(tmp_path, tok):
    tok.hf.save_pretrained(tmp_path)  # already holds the additions -> [PAD] clash is detected
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        ShowoTokenizer.from_pretrained(str(tmp_path), codebook_size=64)
    fresh = ShowoTokenizer.build_for_tests(codebook_size=64)
    _wrap_fast(_train_bpe_json((BUILTIN_CORPUS,), 1000)).save_pretrained(tmp_path / "base")
    loaded = ShowoTokenizer.from_pretrained(str(tmp_path / "base"), codebook_size=64)
    assert (loaded.pad_id, loaded.image_offset) == (fresh.pad_id, fresh.image_offset)
    assert loaded.encode("a red cup") == fresh.encode("a red cup")
    assert loaded.hf.padding_side == "left"


# ------------------------------------------------------------------------------------------- t2i


def test_t2i_layout_and_uncond(tok):
    t2i = build_t2i_inputs(tok, ["A photo of a dog.", "a cat"], num_image_tokens=16)
    assert t2i.text_len == 129 and t2i.input_ids.shape == (2, 129 + 16 + 2) and t2i.truncated == [False, False]
    ids = t2i.input_ids[0].tolist()
    text = tok.encode("A photo of a dog.")
    n = 129 - (len(text) + 3)
    assert ids[:129] == [tok.pad_id] * n + [tok.t2i_id, tok.bos_id, *text, tok.eos_id]
    assert ids[129] == tok.soi_id and ids[-1] == tok.eoi_id
    assert ids[t2i.image_slice] == [tok.mask_id] * 16
    un = t2i.uncond_input_ids[1].tolist()
    assert un[:129] == [tok.pad_id] * 126 + [tok.t2i_id, tok.bos_id, tok.eos_id]
    assert un[129:] == t2i.input_ids[1, 129:].tolist()
    codes = torch.arange(32).view(2, 16) % 64
    with_img = build_t2i_inputs(tok, ["x", "y"], 16, image_ids=codes)
    assert torch.equal(with_img.input_ids[:, with_img.image_slice], codes + tok.image_offset)
    with pytest.raises(ValueError, match="code ids"):
        build_t2i_inputs(tok, ["x"], 2, image_ids=torch.tensor([[0, 64]]))


def test_t2i_truncation(tok):
    long = " ".join(["dog"] * 300)
    t2i = build_t2i_inputs(tok, [long], num_image_tokens=4, max_text_len=128)
    ids = tok.encode(long)
    assert t2i.truncated == [True]
    assert t2i.input_ids[0, :129].tolist() == ([tok.t2i_id, tok.bos_id, *ids])[:128] + [tok.eos_id]


def test_t2i_mask_rules(tok):
    t2i = build_t2i_inputs(tok, ["A photo of a dog.", "a big grey cat sitting on a table"], num_image_tokens=8,
                           max_text_len=20)
    ids = t2i.input_ids
    m = t2i_attention_mask(ids, tok)[:, 0]
    L = ids.shape[1]
    img = slice(t2i.text_len, L)  # soi..eoi
    for b in range(2):
        pad = ids[b] == tok.pad_id
        assert pad.any()
        assert not m[b][~pad][:, pad].any()  # nobody (non-pad) attends to pads
        assert torch.equal(m[b][pad][:, pad], torch.eye(int(pad.sum()), dtype=torch.bool))  # pad rows: self only
        assert not m[b][: t2i.text_len, img].any()  # text never attends to image
        txt = (~pad[: t2i.text_len]).nonzero().flatten()
        sub = m[b][txt][:, txt]
        assert torch.equal(sub, torch.tril(torch.ones_like(sub)))  # text causal
        assert m[b][img][:, ~pad].all()  # soi..eoi rows see every non-pad position (bidirectional image)
        assert m[b].any(-1).all()  # no empty row
    add = to_additive_mask(t2i_attention_mask(ids, tok), torch.bfloat16)
    assert add.dtype == torch.bfloat16 and add.max() == 0 and add.min() == torch.finfo(torch.bfloat16).min


def test_t2i_mask_equals_showo_reference_rule(tok):
    """Non-pad rows equal a direct transcription of create_attention_mask_predict_next(rm_pad_in_image=True)."""
    t2i = build_t2i_inputs(tok, ["a cat", "A photo of a red cup on a table."], num_image_tokens=5, max_text_len=16)
    ids = t2i.input_ids
    ours = t2i_attention_mask(ids, tok)[:, 0]
    N, L = ids.shape
    for b in range(N):
        seq = ids[b].tolist()
        s, e = seq.index(tok.soi_id), seq.index(tok.eoi_id)
        pads = [i for i, t in enumerate(seq) if t == tok.pad_id]
        last_pad = pads[-1] if pads else -1
        for i in range(last_pad + 1, L):
            for j in range(L):
                if s <= i <= e:
                    want = j not in pads
                else:
                    want = j <= i and j > last_pad
                assert bool(ours[b, i, j]) == want, (b, i, j)


# ------------------------------------------------------------------------------------------- mmu


def test_mmu_layout_and_mask(tok):
    codes = torch.randint(0, 64, (2, 6))
    mmu = build_mmu_inputs(tok, codes, ["What is this?", "Is <x> a dog sitting on the sofa today?"])
    ids = mmu.input_ids
    q = tok.encode(MMU_TEMPLATE.format("What is this?"))
    row0 = [tok.mmu_id, tok.soi_id, *(codes[0] + tok.image_offset).tolist(), tok.eoi_id, tok.sot_id, *q]
    pad0 = ids.shape[1] - len(row0)
    assert pad0 > 0 and ids[0].tolist() == [tok.pad_id] * pad0 + row0
    assert mmu.prompt_lens[0] == len(row0) and mmu.prompt_lens[1] == ids.shape[1] and mmu.prefix_len == 9
    m = mmu.attention_mask[:, 0]
    assert torch.equal(mmu.attention_mask, mmu_attention_mask(ids, tok))
    for b in range(2):
        pad = ids[b] == tok.pad_id
        start = int(pad.sum())
        eoi = start + 8
        assert not m[b][~pad][:, pad].any()
        assert m[b, start:eoi + 1, start:eoi + 1].all()  # prefix bidirectional
        assert m[b, eoi + 1:, start:eoi + 1].all()  # text sees the whole prefix
        sub = m[b, eoi + 1:, eoi + 1:]
        assert torch.equal(sub, torch.tril(torch.ones_like(sub)))  # text causal
        assert not m[b, start:eoi + 1, eoi + 1:].any()  # prefix does not see text
        assert m[b].any(-1).all()


def test_masks_run_through_the_model(tok):
    """A left-padded row's non-pad logits equal the same row without padding (pads are invisible)."""
    from backbone.phi import ShowoPhi, ShowoPhiConfig

    torch.manual_seed(0)
    model = ShowoPhi(ShowoPhiConfig.tiny(vocab_size=tok.vocab_size)).eval()
    codes = torch.randint(0, 64, (2, 4))
    mmu = build_mmu_inputs(tok, codes, ["hi", "What colour is the dog on the sofa?"])
    solo = build_mmu_inputs(tok, codes[:1], ["hi"])
    n = solo.input_ids.shape[1]
    pad = mmu.input_ids.shape[1] - n
    with torch.no_grad():
        # positions differ by the pad count (Show-o numerics: arange incl. pads), so shift them back for the check
        a = model(mmu.input_ids, mmu.attention_mask, position_ids=torch.arange(-pad, n)[None].clamp(min=0)).logits
        b = model(solo.input_ids, solo.attention_mask).logits
    torch.testing.assert_close(a[0, pad:], b[0], atol=1e-5, rtol=1e-5)
