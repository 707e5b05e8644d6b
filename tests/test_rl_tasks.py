"""Understanding tasks, understanding / compound prompts, the D9 budget and reward prompts (SFT style; the released
style is checked against the released code's logic in tests/test_released_layout.py)."""
from __future__ import annotations

import numpy as np
import pytest

from backbone.tokenizer import ShowoTokenizer
from rl.data.reader import DatasetError, load_concept_dataset
from rl.data.sample import write_sample_dataset
from rl.grpo.seeding import make_numpy_generator, sample_seed
from rl.grpo.tasks import (
    ConceptPromptTokens,
    UnderstandingTask,
    base_prompt,
    build_compound_prompt,
    build_understanding_prompt,
    clean_ir,
    compound_fixed_part,
    fit_to_budget,
    reward_prompt,
    reward_prompt_text,
    sample_task,
    text_budget,
)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = write_sample_dataset(tmp_path_factory.mktemp("tasks") / "ds", image_size=32, log=lambda s: None)
    return load_concept_dataset(root)


@pytest.fixture(scope="module")
def tok_and_tokens():
    tok = ShowoTokenizer.build_for_tests()
    astro = tok.add_concept("astro", 24)
    chelsea = tok.add_concept("chelsea", 24)  # second concept: different token names
    return tok, ConceptPromptTokens.from_concept_tokens(astro), ConceptPromptTokens.from_concept_tokens(chelsea)


def test_sample_task_ratio_and_content(ds):
    rng = make_numpy_generator(sample_seed(0, 0, 0, 0, 0, "task"))
    tasks = [sample_task(ds, "astro", rng) for _ in range(200)]
    kinds = [t.kind for t in tasks]
    assert 70 < kinds.count("text") < 130  # 1:1 by default
    info = ds.concept("astro").info
    for t in tasks:
        assert t.image.dtype == np.uint8 and t.image.ndim == 3
        if t.kind == "text":
            assert t.image.max() == 0 and t.image_name == "black_512x512.png"
            assert t.candidates == info.extra_info
            assert t.reference == info.extra_info[t.target_index]
            assert t.gen_prompt == t.question and "<astro>" in t.question
        else:
            assert t.image.max() > 0 and t.target_index is None and not t.candidates
            qas = ds.concept("astro").train.conversations[t.image_name]
            assert any(q.query == t.question and q.answer == t.reference for q in qas)
            assert t.gen_prompt == "A photo of <astro>."
    only_visual = [sample_task(ds, "cuppa", rng, text_ratio=0.0).kind for _ in range(20)]
    assert set(only_visual) == {"visual"}


def test_text_target_is_matching_item(ds):
    rng = np.random.default_rng(1)
    info = ds.concept("chelsea").info
    reasoning = {r.prompt: r.answer_index for r in ds.concept("chelsea").train.reasoning}
    for _ in range(10):
        t = sample_task(ds, "chelsea", rng, text_ratio=1.0)
        assert t.reference == info.extra_info[reasoning[t.question]]
    assert ds.concept("chelsea").info.extra_info[1].startswith("<chelsea> sleeps")


def test_sample_task_errors(ds):
    with pytest.raises(DatasetError, match="unknown concept"):
        sample_task(ds, "bo", np.random.default_rng(0))
    saved = ds.concept("astro").train.reasoning
    ds.concept("astro").train.reasoning = []
    try:
        with pytest.raises(DatasetError, match="t2i_conditions.json"):
            sample_task(ds, "astro", np.random.default_rng(0), text_ratio=1.0)
    finally:
        ds.concept("astro").train.reasoning = saved


def test_reproducible_with_seeds(ds):
    def draw(i):
        return sample_task(ds, "cuppa", make_numpy_generator(sample_seed(7, 3, i, 0, 0, "task")))
    a = [(t.kind, t.question) for t in map(draw, range(6))]
    b = [(t.kind, t.question) for t in map(draw, range(6))]
    assert a == b


def test_prompt_tokens_names():
    t = ConceptPromptTokens.from_names("bo")
    assert t.t2i_phrase() == "".join(f"<token_{i}>" for i in range(24)) + " <bo>"
    assert t.mmu_prefix() == "<bo> is " + "".join(f"<token_{i}>" for i in range(16)) + "."
    s3 = ConceptPromptTokens.from_names("bo", num_stage3=8)
    assert s3.mmu_prefix().endswith("<token_15><token_24><token_25><token_26><token_27><token_28><token_29>"
                                    "<token_30><token_31>.")
    assert "<token_24>" not in s3.t2i_phrase()


def test_understanding_prompts_carry_concept_tokens(ds, tok_and_tokens):
    tok, astro, _ = tok_and_tokens
    rng = np.random.default_rng(3)
    vis = sample_task(ds, "astro", rng, text_ratio=0.0, style="sft")
    txt = sample_task(ds, "astro", rng, text_ratio=1.0, style="sft")
    pv = build_understanding_prompt(vis, astro)
    pt = build_understanding_prompt(txt, astro)
    prefix = "<astro> is " + "".join(f"<token_{i}>" for i in range(16)) + "."
    assert pv == f"{prefix} {vis.question}"
    assert pt.startswith(prefix) and "<token_16>" not in pt
    for i, item in enumerate(txt.candidates):
        assert f"({i + 1}) {item}" in pt
    assert txt.question.rstrip(".") in pt and "exactly that item" in pt
    ids = tok.encode(pv)
    for tid in tok.concepts["astro"].token_ids[:16]:
        assert tid in ids


def test_compound_prompts(ds, tok_and_tokens):
    tok, astro, chelsea = tok_and_tokens
    rng = np.random.default_rng(4)
    vis = sample_task(ds, "astro", rng, text_ratio=0.0, style="sft")
    cp, cut = build_compound_prompt(vis, "<astro> is wearing an orange spacesuit.<|endoftext|>", astro, tok)
    assert not cut
    assert cp == base_prompt(astro) + " <astro> is wearing an orange spacesuit."
    assert cp.startswith("A photo of <token_0><token_1>") and "<token_23> <astro>." in cp
    txt = sample_task(ds, "chelsea", rng, text_ratio=1.0, style="sft")
    cp2, _ = build_compound_prompt(txt, txt.reference, chelsea, tok)
    phrase = "".join(f"<chelsea_token_{i}>" for i in range(24)) + " <chelsea>"
    assert cp2.startswith(txt.question.replace("<chelsea>", phrase, 1).rstrip("."))
    assert cp2.endswith(txt.reference)
    assert cp2.count("<chelsea_token_0>") == 1


def test_long_ir_is_cut_not_concept_tokens(ds, tok_and_tokens):
    tok, astro, _ = tok_and_tokens
    task = sample_task(ds, "astro", np.random.default_rng(5), text_ratio=0.0, style="sft")
    long_ir = " ".join(["<astro> is wearing a bright orange spacesuit with many colourful patches"] * 20)
    budget = text_budget(128)
    assert budget == 126
    cp, cut = build_compound_prompt(task, long_ir, astro, tok, budget=budget)
    assert cut
    n = len(tok.encode(cp))
    assert budget - 3 <= n <= budget
    fixed = compound_fixed_part(task, astro)
    assert cp.startswith(fixed + " <astro> is wearing")
    ids = tok.encode(cp)
    assert all(t in ids for t in tok.concepts["astro"].all_ids)
    # fixed part alone too long -> error; exactly fitting fixed part -> IR dropped, counted as cut
    n_fixed = len(tok.encode(fixed))
    with pytest.raises(ValueError, match="fixed part alone"):
        fit_to_budget(tok, fixed, "x", n_fixed - 1)
    assert fit_to_budget(tok, fixed, long_ir, n_fixed) == (fixed, True)
    assert fit_to_budget(tok, fixed, "", n_fixed) == (fixed, False)


class WhitespaceTok:
    """Stand-in tokenizer: one id per whitespace-separated word."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.inv: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.vocab)
                self.inv[self.vocab[w]] = w
            out.append(self.vocab[w])
        return out

    def decode(self, ids) -> str:
        return " " + " ".join(self.inv[i] for i in ids)


def test_budget_with_stand_in_tokenizer():
    t = WhitespaceTok()
    text, cut = fit_to_budget(t, "A photo of <bo>.", "one two three four five", budget=6)
    assert (text, cut) == ("A photo of <bo>. one two", True)


def test_clean_ir_and_reward_prompt(tok_and_tokens):
    _, astro, _ = tok_and_tokens
    assert clean_ir("  <astro> is  tall.<|endoftext|>[PAD]") == "<astro> is tall."
    cp = base_prompt(astro) + " <astro> is wearing a hat."
    assert reward_prompt(cp, astro, "woman") == "A photo of woman. woman is wearing a hat."
    task = UnderstandingTask(kind="audio", concept="astro", category="human", class_word="woman",
                             image=np.zeros((2, 2, 3), np.uint8), image_name="x", question="q", reference="r",
                             gen_prompt="A photo of <astro>.")
    with pytest.raises(ValueError, match="kind"):
        build_understanding_prompt(task, astro)


def test_accepts_tokenizer_concept_tokens(ds, tok_and_tokens):
    tok, astro, _ = tok_and_tokens
    task = sample_task(ds, "astro", np.random.default_rng(6), text_ratio=0.0, style="sft")
    ct = tok.concepts["astro"]
    assert build_understanding_prompt(task, ct) == build_understanding_prompt(task, astro)
    assert build_compound_prompt(task, "hi", ct, tok) == build_compound_prompt(task, "hi", astro, tok)
    assert reward_prompt_text(base_prompt(ct), ct, "woman") == "A photo of woman."
