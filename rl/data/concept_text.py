"""The text of a new concept: profile, facts, reasoning prompts, captions and question–answer pairs.

Two writers produce a :class:`ConceptText` from a :class:`ConceptBrief` (name, class word, category, profile, facts):

* :func:`template_text` — offline and deterministic: the profile as ``"<c> is ..."``, the facts as given, one
  reasoning prompt per fact in the released ``t2i_conditions.json`` style (``"A photo of <c> having breakfast"``:
  a scene that needs the fact without stating it, no final period), recognition / description questions from the
  class word and the profile, and a text-only question per fact;
* :class:`VLMTextWriter` (:mod:`rl.data.concept_vlm`) — an OpenAI-compatible chat endpoint writes the captions,
  conversations and reasoning prompts grounded in the photos.

Facts and profile are normalised and checked here (:func:`normalise_profile`, :func:`normalise_facts`): each fact
must name the concept (``<name>`` or the placeholder ``<c>``, or start with He / She / It / They), facts must be
distinct, and every string ends up naming the concept as ``<name>``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ConceptBrief", "ConceptText", "TextError", "template_text", "normalise_profile", "normalise_facts",
           "read_facts", "pronouns", "fact_scene", "article", "profile_tail"]


class TextError(ValueError):
    """Profile, facts or a writer's reply cannot make the concept's text; one line naming the problem."""


@dataclass
class ConceptBrief:
    """What the user says about the concept."""

    name: str
    """Concept name (``<name>`` in every text)."""
    class_word: str
    """Class word ("dog", "mug", "woman")."""
    category: str
    """"human" | "animal" | "object"."""
    profile: str
    """One-sentence profile, normalised to ``"<name> is ..."``."""
    facts: list[str] = field(default_factory=list)
    """Extra facts (``extra_info``), each naming ``<name>``."""

    @property
    def token(self) -> str:
        """``"<name>"``."""
        return f"<{self.name}>"


@dataclass
class ConceptText:
    """Every text of the concept's files, keyed by the written image names (``"0.png"``)."""

    info: str
    """``info.json`` ``info``."""
    extra_info: list[str]
    """``info.json`` ``extra_info``."""
    reasoning: list[str]
    """``t2i_conditions.json`` personalized-driven prompts, one per fact, same order."""
    captions: dict[str, str]
    """Training photo → caption (``captions.json``)."""
    conversations: dict[str, list[tuple[str, str]]]
    """Training photo → (question, answer) pairs (``conversations.json``)."""
    test_vqa: dict[str, list[tuple[str, str]]]
    """Test photo → (question, answer) pairs (``vqa.json``, VQA items of ``test_data/<c>.json``)."""
    text_only: list[tuple[str, str]]
    """(question, answer) pairs answered from the profile and facts (``text_only.json``, text-only items)."""
    source: str = "templates"
    """"templates" or "vlm <model> at <url>"."""


# ------------------------------------------------------------------------------------------ words
_FEMALE = {"woman", "girl", "lady", "mother", "mom", "mum", "grandmother", "grandma", "sister", "daughter", "aunt",
           "wife", "queen", "actress", "niece", "granny"}
_MALE = {"man", "boy", "gentleman", "father", "dad", "grandfather", "grandpa", "brother", "son", "uncle", "husband",
         "king", "actor", "nephew"}


def pronouns(brief: ConceptBrief) -> tuple[str, str, str]:
    """(subject, object, possessive) for the concept: her / his / their for humans by class word, its otherwise."""
    w = brief.class_word.lower().split()[-1]
    if brief.category == "human":
        return ("she", "her", "her") if w in _FEMALE else ("he", "him", "his") if w in _MALE else \
            ("they", "them", "their")
    return "it", "it", "its"


def article(word: str) -> str:
    """"an" before a vowel sound (by spelling), else "a"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


_SUBJECT = re.compile(r"^(he|she|it|they|this \w+)\s+", re.IGNORECASE)


def normalise_profile(name: str, class_word: str, profile: str | None) -> str:
    """``"<name> is ..."``: the placeholder ``<c>`` becomes ``<name>``; a profile without the concept gets it as
    subject ("a tabby cat with green eyes" → "<name> is a tabby cat with green eyes.", "She is a teacher." →
    "<name> is a teacher."); no profile: "<name> is a <class>."."""
    tok = f"<{name}>"
    if not profile or not profile.strip():
        return f"{tok} is {article(class_word)} {class_word}."
    text = profile.strip().replace("<c>", tok)
    if tok not in text:
        m = _SUBJECT.match(text)
        text = (tok + " " + text[m.end():]) if m else f"{tok} is {text[0].lower() + text[1:]}"
    if len(text) > 400:
        raise TextError(f"--profile: {len(text)} characters; keep it to one sentence (400 at most: it is appended to "
                        "every generation prompt inside Show-o's 128-token text block)")
    return _sentence(text)


def normalise_facts(name: str, facts: list[str], where: str) -> list[str]:
    """The facts with ``<c>`` → ``<name>`` and a leading He / She / It / They replaced by ``<name>``; TextError
    naming ``where`` and the item for a fact that does not name the concept, a duplicate or an over-long fact."""
    tok, out = f"<{name}>", []
    for i, raw in enumerate(facts, 1):
        text = " ".join(raw.replace("<c>", tok).split())
        if tok not in text:
            m = _SUBJECT.match(text)
            if not m:
                raise TextError(f"{where}: fact {i} {raw!r} must name the concept ({tok} or <c>, or start with "
                                "He/She/It/They)")
            text = tok + " " + text[m.end():]
        text = _sentence(text)
        if len(text) > 300:
            raise TextError(f"{where}: fact {i} is {len(text)} characters (300 at most)")
        if text in out:
            raise TextError(f"{where}: fact {i} repeats fact {out.index(text) + 1}: {text!r}")
        out.append(text)
    return out


def read_facts(path: str | Path) -> list[str]:
    """A facts file: a JSON list of strings, or text with one fact per line (blank lines and ``#`` lines skipped);
    TextError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise TextError(f"--facts {p}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"--facts {p}: not UTF-8 text (byte {e.start})") from e
    if p.suffix.lower() == ".json":
        try:
            facts = json.loads(text)
        except json.JSONDecodeError as e:
            raise TextError(f"--facts {p}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(facts, list) or not all(isinstance(x, str) and x.strip() for x in facts):
            raise TextError(f"--facts {p}: expected a JSON list of non-empty strings")
        return [x.strip() for x in facts]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def profile_tail(brief: ConceptBrief) -> str:
    """The profile without its ``"<name> is "`` subject and final period ("a tabby cat with green eyes")."""
    tail = brief.profile.removeprefix(f"{brief.token} is ").rstrip(".!?")
    return tail if tail != brief.profile.rstrip(".!?") else f"{article(brief.class_word)} {brief.class_word}"


# ------------------------------------------------------------------------------------------ reasoning prompts
# keyword rule → (scene after "A photo of <c> ", text-only question); {p} possessive, {o} object, {s} subject pronoun
_SCENES: list[tuple[str, str, str]] = [
    (r"birthday|celebrat|party|anniversar|christmas|wedding", "at {p} celebration", "How does {c} celebrate?"),
    (r"wear|wears|wearing|dress|outfit|jacket|coat|shirt|hat|cap|scarf|collar|glasses|shoes|boots|uniform|costume",
     "dressed for the occasion", "What does {c} usually wear?"),
    (r"eat|eats|ate|drink|drinks|food|breakfast|lunch|dinner|coffee|tea|snack|meal|treat|bowl",
     "at meal time", "What does {c} like to eat or drink?"),
    (r"sleep|sleeps|nap|naps|bed|basket|cushion|blanket", "taking a nap", "Where does {c} sleep?"),
    (r"price|cost|costs|\$|€|£|bought|paid|worth", "on a shop shelf with {p} price tag", "How much does {c} cost?"),
    (r"gift|present|given|came from|made in|made by|born|adopted|found", "next to a reminder of where {s} came from",
     "Where does {c} come from?"),
    (r"visit|visited|trip|travel|holiday|vacation|journey|mountain|beach|abroad|picnic", "on {p} last outing",
     "Where has {c} been?"),
    ((r"play|plays|toy|ball|game|hobby|read|reads|novel|book|sport|jog|jogging|run|swim|guitar|piano|violin|paint|"
      r"draw|sing|dance|garden"), "enjoying {p} favourite pastime", "What does {c} do for fun?"),
    (r"work|works|job|office|school|study|studies|teach|teaches", "on a working day", "What does {c} do for work?"),
    (r"kept|stored|stands|lives|live|home|shelf|room|house|kitchen|window", "in {p} usual spot",
     "Where is {c} usually found?"),
    (r"friend|dog|cat|pet|brother|sister|mother|father|family|owner|child|children", "with {p} companion",
     "Who does {c} spend time with?"),
    (r"wash|washed|clean|cleaned|care|groom|brush", "being looked after", "How is {c} looked after?"),
    (r"morning|evening|night|sunday|saturday|weekend|every day|daily|weekly", "on a typical day",
     "What does {c} do regularly?"),
]
_FALLBACK_SCENES = ["in {p} everyday life", "at a special moment", "in a familiar place", "on an ordinary afternoon",
                    "with something that matters to {o}", "in a scene that tells {p} story"]
_FALLBACK_QUESTION = "What else do you know about {c}?"


def fact_scene(brief: ConceptBrief, fact: str, taken: set[str]) -> tuple[str, str]:
    """(reasoning prompt, text-only question) for one fact: the first keyword rule it matches whose scene is not
    ``taken`` yet, else the next free generic scene; the prompt is ``"A photo of <name> <scene>"`` (released style:
    no final period) and asks for the fact without stating it."""
    s, o, p = pronouns(brief)
    body = fact.replace(brief.token, " ").lower()
    fill = {"p": p, "o": o, "s": s, "c": brief.token}
    for pattern, scene, question in _SCENES:
        if re.search(rf"(?<![a-z])(?:{pattern})(?![a-z])", body):
            prompt = f"A photo of {brief.token} {scene.format(**fill)}"
            if prompt not in taken:
                return prompt, question.format(**fill)
    for scene in _FALLBACK_SCENES:
        prompt = f"A photo of {brief.token} {scene.format(**fill)}"
        if prompt not in taken:
            return prompt, _FALLBACK_QUESTION.format(**fill)
    k = 2
    while f"A photo of {brief.token} in {p} everyday life, scene {k}" in taken:
        k += 1
    return f"A photo of {brief.token} in {p} everyday life, scene {k}", _FALLBACK_QUESTION.format(**fill)


def _reasoning(brief: ConceptBrief) -> tuple[list[str], list[tuple[str, str]]]:
    taken: set[str] = set()
    prompts, questions = [], []
    for fact in brief.facts:
        prompt, question = fact_scene(brief, fact, taken)
        taken.add(prompt)
        prompts.append(prompt)
        questions.append((question, fact))
    return prompts, questions


# ------------------------------------------------------------------------------------------ offline templates
def _visual_qa(brief: ConceptBrief) -> list[tuple[str, str]]:
    tok, cls = brief.token, brief.class_word
    who = "Who" if brief.category == "human" else "What"
    return [(f"{who} is in this photo?", f"This is {tok}, {profile_tail(brief)}."),
            (f"What is {tok}?", f"{tok} is {article(cls)} {cls}."),
            (f"Describe {tok}.", brief.profile)]


def template_text(brief: ConceptBrief, train_keys: list[str], test_keys: list[str]) -> ConceptText:
    """The offline, deterministic text of the concept (module docstring); ``train_keys`` / ``test_keys`` are the
    written photo names."""
    qa = _visual_qa(brief)
    prompts, questions = _reasoning(brief)
    conv = {k: [qa[i % 3], qa[(i + 1) % 3]] for i, k in enumerate(train_keys)}
    vqa = {k: [qa[i % 3]] for i, k in enumerate(test_keys)}
    captions = {k: f"A photo of {brief.token}, {profile_tail(brief)}." for k in train_keys}
    return ConceptText(info=brief.profile, extra_info=list(brief.facts), reasoning=prompts, captions=captions,
                       conversations=conv, test_vqa=vqa, text_only=[(f"Describe {brief.token}.", brief.profile)]
                       + questions)
