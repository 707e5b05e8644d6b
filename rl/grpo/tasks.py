"""Understanding reasoning tasks and the prompts around them (design "What the service does" 1–2, D8, D9).

* :func:`sample_task` draws a visual-instruct task (training image + question from conversations.json →
  reference answer) or a text-only task (all extra_info + a reasoning prompt IP → the matching item, with
  the black placeholder as image input), 1:1 by default.
* :func:`build_understanding_prompt` is the question text of the mmu prompt (the ``USER: … ASSISTANT:``
  wrapper is added by ``backbone.prompts.build_mmu_inputs``). It starts with UniCTokens' system prefix
  ``"<c> is <token_0>…<token_15>."`` (stage-3 tokens, if any, follow the understanding tokens).
* :func:`build_compound_prompt` makes CP = BP + IR (visual) or IP + IR (text). The fixed part names the
  concept as UniCTokens' T2I prompts do, ``"<token_0>…<token_23> <c>"``: BP = ``"A photo of <tokens> <c>."``;
  in IP only the first ``<c>`` is expanded. If CP exceeds the text budget, IR is cut at a token boundary
  (never the fixed part); only a fixed part that alone does not fit is an error (D9).
* :func:`reward_prompt` is the text BER / CLIP-T score: concept tokens stripped, ``<c>`` → class word (D8).

Two prompt styles (``data.prompt_style``), both built here from the same task:

* ``"released"`` (default): byte for byte what the released GRPO code (``sync_r1_grpo/grpo.py``) builds, so a run on
  the released data and checkpoints sees the paper's prompts. Visual question = the conversations.json query as is;
  text-only question = grpo.py's template (with its indentation and the Python list of extra_info);
  CP = ``"A photo of <token_0>…<token_23><c>.\n" + info + IR`` (visual) or
  ``before + " " + <tokens><c> + " " + after + "." + info + IR`` (text: the prompt split at its first ``<c>``);
  IR = the answer's first sentence with the class word replaced by ``<c>`` (:func:`released_ir`; the released code's
  optional external-LLM rewrite is not reproduced); reward text = CP with the ``<token_i>`` strings removed.
* ``"sft"``: the UniCTokens-SFT layout this service used first: every question starts with the ``"<c> is
  <token_0>…<token_15>."`` prefix the concept tokens were trained with, CP = ``"A photo of <tokens> <c>." + " " +
  IR``, reward text with ``<c>`` → class word (D8). It keeps the profile sentence out of the 128-token block.

Token strings come from the tokenizer's ``ConceptTokens`` (names differ for a second concept), never
hard-coded; :meth:`ConceptPromptTokens.from_names` builds UniCTokens' names for tokenizer-free use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rl.data.reader import ConceptDataset, DatasetError

__all__ = ["UnderstandingTask", "ConceptPromptTokens", "sample_task", "build_understanding_prompt",
           "text_only_question", "base_prompt", "expand_concept", "compound_fixed_part", "fit_to_budget",
           "build_compound_prompt", "clean_ir", "reward_prompt", "reward_prompt_text", "text_budget",
           "as_prompt_tokens", "PROMPT_STYLES", "released_text_question", "released_fixed_part", "released_ir"]

TASK_KINDS = ("visual", "text")
PROMPT_STYLES = ("released", "sft")
"""``data.prompt_style`` values (module docstring)."""

RELEASED_TEXT_TEMPLATE = (
    "\n"
    "                            Below is some information about {concept} : {extra_info}\n"
    "                            Please make inferences based on the following prompt: {question}. \n"
    "                            If the prompt relates to a specific item from the aforementioned information list, \n"
    "                            output and only output that exact item. \n"
    "                            If the prompt does not relate to any item in the list, \n"
    "                            output nothing (i.e., an empty response).\n"
    "                            ")
"""The released grpo.py text-only question, whitespace included (``extra_info`` is the Python list's repr)."""


class TextTokenizer(Protocol):
    """What the prompt budget needs from a tokenizer (``backbone.tokenizer.ShowoTokenizer`` fits)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class UnderstandingTask:
    """One understanding reasoning task (the first half of a rollout)."""

    kind: str
    """"visual" (image + question) or "text" (extra_info + reasoning prompt, black image)."""
    concept: str
    """Concept name."""
    category: str
    """human | animal | object."""
    class_word: str
    """Class word (for reward prompts)."""
    image: np.ndarray
    """uint8 [H, W, 3] image input (a training photo, or the black placeholder)."""
    image_name: str
    """File name of the image input."""
    question: str
    """The question (visual) or the reasoning prompt IP (text), with "<c>" as written in the data."""
    reference: str
    """Reference answer (visual) or the target extra_info item (text)."""
    gen_prompt: str
    """Generation prompt the CP starts from: "A photo of <c>." (BP, visual) or IP (text)."""
    candidates: list[str] = field(default_factory=list)
    """All extra_info items (text tasks; the TIER candidates), empty for visual tasks."""
    target_index: int | None = None
    """Index of the reference in candidates (text tasks)."""
    profile: str = ""
    """info.json's "info" sentence (the released style appends it to CP)."""
    style: str = "released"
    """Prompt style of every string built from this task (:data:`PROMPT_STYLES`)."""


@dataclass(frozen=True)
class ConceptPromptTokens:
    """The concept's token strings, split by role (D10: 16 understanding, 8 generation, stage-3 extra)."""

    concept: str
    """The identifier, e.g. "<bo>"."""
    understanding: tuple[str, ...]
    """Understanding tokens (the mmu system prefix)."""
    generation: tuple[str, ...]
    """Generation tokens (with the understanding ones, the T2I phrase)."""
    stage3: tuple[str, ...] = ()
    """Stage-3 tokens (appended to the mmu prefix)."""

    @classmethod
    def from_concept_tokens(cls, ct: Any, num_understanding: int = 16, num_generation: int = 8
                            ) -> "ConceptPromptTokens":
        """From a ``ConceptTokens`` (``concept_str``, ``token_strs``): the first ``num_understanding`` are
        understanding tokens, the next ``num_generation`` generation tokens, the rest stage-3 tokens."""
        toks = list(ct.token_strs)
        if len(toks) < num_understanding + num_generation:
            raise ValueError(f"concept {ct.concept_str}: {len(toks)} tokens < num_understanding + num_generation "
                             f"= {num_understanding + num_generation}")
        u, g = num_understanding, num_understanding + num_generation
        return cls(ct.concept_str, tuple(toks[:u]), tuple(toks[u:g]), tuple(toks[g:]))

    @classmethod
    def from_names(cls, name: str, num_understanding: int = 16, num_generation: int = 8,
                   num_stage3: int = 0) -> "ConceptPromptTokens":
        """UniCTokens' names: ``<name>``, ``<token_0>`` … (the first concept of a tokenizer)."""
        t = [f"<token_{i}>" for i in range(num_understanding + num_generation + num_stage3)]
        g = num_understanding + num_generation
        return cls(f"<{name}>", tuple(t[:num_understanding]), tuple(t[num_understanding:g]), tuple(t[g:]))

    def t2i_phrase(self) -> str:
        """``"<token_0>…<token_23> <c>"``: how T2I prompts name the concept."""
        return "".join(self.understanding + self.generation) + " " + self.concept

    def released_system_prompt(self) -> str:
        """eval_p_mmu.py's system prompt: ``"<c> is "`` + understanding + stage-3 tokens, ``".\\n"`` only after
        stage-3 tokens (as released)."""
        return f"{self.concept} is {''.join(self.understanding + self.stage3)}" + (".\n" if self.stage3 else "")

    def mmu_prefix(self) -> str:
        """``"<c> is <token_0>…<token_15>."``: UniCTokens' system prefix of the first user turn."""
        return f"{self.concept} is {''.join(self.understanding + self.stage3)}."

    def all_tokens(self) -> tuple[str, ...]:
        """Every learnable token string."""
        return self.understanding + self.generation + self.stage3


def as_prompt_tokens(tokens: Any, num_understanding: int = 16, num_generation: int = 8) -> ConceptPromptTokens:
    """``tokens`` as :class:`ConceptPromptTokens`; a tokenizer ``ConceptTokens`` is split with the given counts."""
    if isinstance(tokens, ConceptPromptTokens):
        return tokens
    if hasattr(tokens, "concept_str") and hasattr(tokens, "token_strs"):
        return ConceptPromptTokens.from_concept_tokens(tokens, num_understanding, num_generation)
    raise ValueError(f"expected ConceptPromptTokens or ConceptTokens, got {type(tokens).__name__}")


# ------------------------------------------------------------------------------------------ tasks
def sample_task(dataset: ConceptDataset, concept: str, rng: np.random.Generator,
                text_ratio: float = 0.5, style: str = "released") -> UnderstandingTask:
    """Draw one task for ``concept``: text-only with probability ``text_ratio``, else visual-instruct.

    Visual (as grpo.py): a training photo uniformly among those with conversations.json pairs, then one of its
    pairs uniformly. Text: uniform over the training reasoning prompts (grpo.py's ``randint(1, int((n+1)*rate))``
    over t2i_conditions, or reasoning.json), each with its extra_info item. Training data only. ``rng`` should
    come from ``rl.grpo.seeding`` (stream "task") so the draw is reproducible.
    """
    if not 0.0 <= text_ratio <= 1.0:
        raise ValueError(f"sample_task: text_ratio must be in [0, 1], got {text_ratio}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    c = dataset.concept(concept)
    info = c.info
    common = dict(concept=info.name, category=info.category, class_word=info.class_word, profile=info.info,
                  style=style)
    if rng.random() < text_ratio:
        if not c.train.reasoning:
            raise DatasetError(f"{dataset.root}/concept/test/{concept}/t2i_conditions.json: concept {concept!r} has "
                               "no training reasoning prompts, so text-only tasks cannot be drawn (set "
                               "data.text_task_ratio=0)")
        rp = c.train.reasoning[int(rng.integers(len(c.train.reasoning)))]
        return UnderstandingTask(kind="text", image=dataset.black(), image_name=dataset.black_image.name,
                                 question=rp.prompt, reference=info.extra_info[rp.answer_index],
                                 gen_prompt=rp.prompt, candidates=list(info.extra_info),
                                 target_index=rp.answer_index, **common)
    if not c.train.conversations:
        raise DatasetError(f"{dataset.root}/concept/train/{concept}/conversations.json: no question-answer pairs for "
                           "any training photo, so visual tasks cannot be drawn (set data.text_task_ratio=1)")
    names = [r.name for r in c.train.images if r.name in c.train.conversations]
    pairs = c.train.conversations[names[int(rng.integers(len(names)))]]
    qa = pairs[int(rng.integers(len(pairs)))]
    return UnderstandingTask(kind="visual", image=c.train.image(qa.image).load(), image_name=qa.image,
                             question=qa.query, reference=qa.answer, gen_prompt=f"A photo of {info.token}.",
                             **common)


# ------------------------------------------------------------------------------------------ understanding
def text_only_question(concept: str, extra_info: list[str], reasoning_prompt: str) -> str:
    """Our wording of the Sync-R1 text-only reasoning template (facts listed, then the prompt IP)."""
    facts = " ".join(f"({i + 1}) {x}" for i, x in enumerate(extra_info))
    ip = reasoning_prompt.strip().rstrip(".")
    return (f"Here is what is known about {concept}: {facts} Use this information to reason about the "
            f"following prompt: {ip}. If the prompt points to one particular item of the information above, "
            f"answer with exactly that item, word for word, and nothing else.")


def released_text_question(concept: str, extra_info: list[str], question: str) -> str:
    """grpo.py's text-only question (:data:`RELEASED_TEXT_TEMPLATE`)."""
    return RELEASED_TEXT_TEMPLATE.format(concept=concept, extra_info=list(extra_info), question=question)


def build_understanding_prompt(task: UnderstandingTask, tokens: ConceptPromptTokens) -> str:
    """The mmu question in the task's style. Released: the visual query as is, or grpo.py's text template. SFT:
    ``tokens.mmu_prefix()`` + the visual question or our text-only template.

    ``tokens`` (here and below): :class:`ConceptPromptTokens` or a tokenizer ``ConceptTokens`` (16 + 8 split)."""
    tokens = as_prompt_tokens(tokens)
    if task.kind not in TASK_KINDS:
        raise ValueError(f"UnderstandingTask.kind must be one of {TASK_KINDS}, got {task.kind!r}")
    if task.style == "released":
        if task.kind == "visual":
            return task.question
        return released_text_question(tokens.concept, task.candidates, task.question)
    if task.kind == "visual":
        body = task.question
    elif task.kind == "text":
        body = text_only_question(tokens.concept, task.candidates, task.question)
    else:
        raise ValueError(f"UnderstandingTask.kind must be one of {TASK_KINDS}, got {task.kind!r}")
    return f"{tokens.mmu_prefix()} {body}"


# ------------------------------------------------------------------------------------------ generation
def base_prompt(tokens: ConceptPromptTokens) -> str:
    """BP with concept tokens: ``"A photo of <token_0>…<token_23> <c>."``."""
    tokens = as_prompt_tokens(tokens)
    return f"A photo of {tokens.t2i_phrase()}."


def expand_concept(prompt: str, tokens: ConceptPromptTokens) -> str:
    """Replace the first ``<c>`` of ``prompt`` by the T2I phrase (tokens + ``<c>``); later mentions stay."""
    tokens = as_prompt_tokens(tokens)
    if tokens.concept not in prompt:
        raise ValueError(f"prompt does not mention {tokens.concept}: {prompt!r}")
    return prompt.replace(tokens.concept, tokens.t2i_phrase(), 1)


def released_fixed_part(task: UnderstandingTask, tokens: ConceptPromptTokens) -> str:
    """grpo.py's CP before the IR: ``"A photo of <tokens><c>.\\n" + info`` (visual) or, the prompt split at its first
    ``<c>``, ``before + " " + <tokens><c> + " " + after + "." + info`` (text)."""
    tokens = as_prompt_tokens(tokens)
    phrase = "".join(tokens.understanding + tokens.generation) + tokens.concept
    if task.kind == "visual":
        return f"A photo of {phrase}.\n" + task.profile
    parts = task.gen_prompt.split(tokens.concept, 1)
    before, after = (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else (task.gen_prompt, "")
    return f"{before} {phrase} {after}." + task.profile


def released_ir(answer_text: str, class_word: str, concept: str) -> str:
    """grpo.py's IR post-processing: class word → ``<c>``, the first line, up to the first "." (else "!", else
    "?"), box markers removed, "" if it says "empty"."""
    text = _SPECIAL.sub("", answer_text).strip()   # as decode(skip_special_tokens=True).strip(): lines kept
    text = text.replace(class_word, concept) if class_word else text
    if text:
        line = text.split("\n", 1)[0]
        for punc in (".", "!", "?"):
            end = line.find(punc)
            if end != -1:
                line = line[:end + 1]
                break
        text = line
    text = text.replace("<|begin_of_box|>", "").replace("<|end_of_box|>", "")
    return "" if "empty" in text else text


def compound_fixed_part(task: UnderstandingTask, tokens: ConceptPromptTokens) -> str:
    """The part of CP that is never cut: released style :func:`released_fixed_part`; SFT style BP (visual) or the
    expanded IP (text)."""
    tokens = as_prompt_tokens(tokens)
    if task.style == "released":
        return released_fixed_part(task, tokens)
    if task.kind == "visual":
        return base_prompt(tokens)
    fixed = expand_concept(task.gen_prompt.strip(), tokens)
    return fixed if fixed.endswith((".", "!", "?")) else fixed + "."


_SPECIAL = re.compile(r"<\|[^|>]*\|>|\[PAD\]")


def clean_ir(answer_text: str) -> str:
    """The reasoning result IR from a decoded answer: special markers removed, whitespace collapsed."""
    return " ".join(_SPECIAL.sub(" ", answer_text).split())


def text_budget(max_text_len: int = 128) -> int:
    """CP token budget of Show-o's t2i text block: ``max_text_len + 1`` slots minus <|t2i|>, bos, eos."""
    return max_text_len - 2


def fit_to_budget(tokenizer: TextTokenizer, fixed: str, ir: str, budget: int, sep: str = " ") -> tuple[str, bool]:
    """``fixed + sep + ir`` within ``budget`` tokens; (text, cut). IR is cut at a token boundary; the fixed
    part never. ValueError when the fixed part alone exceeds the budget."""
    n_fixed = len(tokenizer.encode(fixed))
    if n_fixed > budget:
        raise ValueError(f"compound prompt: the fixed part alone is {n_fixed} tokens > budget {budget}: {fixed!r}")
    if not ir:
        return fixed, False
    full = f"{fixed}{sep}{ir}"
    if len(tokenizer.encode(full)) <= budget:
        return full, False
    ir_ids = tokenizer.encode(sep + ir)
    k = min(len(ir_ids), budget - n_fixed + 1)
    while k > 0:
        text = (fixed + tokenizer.decode(ir_ids[:k]).replace("\ufffd", "")).rstrip()
        if len(tokenizer.encode(text)) <= budget:
            return text, True
        k -= 1
    return fixed, True


def build_compound_prompt(task: UnderstandingTask, ir: str, tokens: ConceptPromptTokens,
                          tokenizer: TextTokenizer, budget: int | None = None) -> tuple[str, bool]:
    """CP = fixed part + IR, fitted to ``budget`` (default :func:`text_budget`); (text, cut). Released style: the
    IR of :func:`released_ir` appended directly; SFT: the clean IR after a space."""
    budget = text_budget() if budget is None else budget
    fixed = compound_fixed_part(task, tokens)
    if task.style == "released":
        concept = as_prompt_tokens(tokens).concept
        return fit_to_budget(tokenizer, fixed, released_ir(ir, task.class_word, concept), budget, sep="")
    return fit_to_budget(tokenizer, fixed, clean_ir(ir), budget)


def reward_prompt(prompt: str, tokens: ConceptPromptTokens, class_word: str, style: str = "sft") -> str:
    """The prompt as reward experts see it. SFT style (D8): concept tokens stripped, ``<c>`` → class word, spaces
    collapsed. Released style: grpo.py's ``remove_token(condition)``, i.e. only the ``<token_i>`` strings removed."""
    tokens = as_prompt_tokens(tokens)
    out = prompt
    for t in sorted(tokens.all_tokens(), key=len, reverse=True):
        out = out.replace(t, "")
    if style == "released":
        return out
    out = out.replace(tokens.concept, class_word)
    return " ".join(out.split())


reward_prompt_text = reward_prompt
"""Alias of :func:`reward_prompt`."""
