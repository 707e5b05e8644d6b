"""VLM-written concept text: captions, conversations and reasoning prompts grounded in the photos.

The endpoint is any OpenAI-compatible ``/chat/completions`` server (GPT-4o, a local vLLM), reached through the
evaluation judge's client (:class:`rl.eval.judge_openai.OpenAIJudge`: the same options ``base_url``, ``model``,
``api_key_env``, ``timeout_s``, ``max_retries``, with its retries of time-outs, 429 and 5xx) — there is no second
HTTP client. Images travel as base64 JPEG data URIs (the judge's encoder), scaled to at most 512 px.

Three kinds of request, each answered with one JSON object that is validated against its schema:

* per photo (training and test): ``{"caption": str, "qa": [{"query": str, "answer": str}, ...]}`` — the caption
  names the concept, 2–4 questions about what the photo shows, each query naming the concept;
* the profile, only when ``--profile`` is not given: ``{"info": "<c> is ..."}`` from up to 4 training photos;
* the reasoning prompts, when there are facts: ``{"prompts": [str, ...]}``, one per fact in order, each starting
  "A photo of <c>", distinct, not quoting its fact.

A reply that is not such an object is asked again (``schema_retries`` times, the reason appended to the request);
after that the whole build stops with :class:`rl.data.concept_text.TextError` naming the request, the endpoint and
the reason. Nothing is written before every reply is valid.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import numpy as np
from PIL import Image

from rl.data.concept_text import ConceptBrief, ConceptText, TextError, template_text

__all__ = ["VLMTextWriter", "SchemaError", "parse_json_reply", "check_photo_reply", "check_profile_reply",
           "check_prompts_reply", "SYSTEM_PROMPT"]

SYSTEM_PROMPT = ("You write training data for a personalised vision-language model. The user's concept is called "
                 "{tok}: always write {tok} (with the angle brackets) where the concept is meant, never a made-up "
                 "name. Answer with one JSON object and nothing else: no markdown, no explanation.")


class SchemaError(ValueError):
    """A reply that does not follow the requested JSON schema."""


def parse_json_reply(text: str) -> Any:
    """The JSON object of a reply (a ```json fence around it is tolerated); SchemaError otherwise."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise SchemaError(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if not isinstance(obj, dict):
        raise SchemaError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _text(obj: dict, key: str, tok: str | None, limit: int, where: str = "") -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise SchemaError(f"{where}{key!r} must be a non-empty string, got {v!r}")
    v = " ".join(v.split())
    if len(v) > limit:
        raise SchemaError(f"{where}{key!r} is {len(v)} characters, {limit} at most")
    if tok is not None and tok not in v:
        raise SchemaError(f"{where}{key!r} must name the concept as {tok}: {v!r}")
    return v


def check_photo_reply(obj: dict, tok: str) -> tuple[str, list[tuple[str, str]]]:
    """(caption, [(query, answer)]) of a per-photo reply (module docstring); SchemaError otherwise."""
    caption = _text(obj, "caption", tok, 300)
    qa = obj.get("qa")
    if not isinstance(qa, list) or not 2 <= len(qa) <= 4:
        raise SchemaError(f"'qa' must be a list of 2 to 4 {{'query', 'answer'}} objects, got {qa!r:.120}")
    out = []
    for i, it in enumerate(qa):
        if not isinstance(it, dict):
            raise SchemaError(f"'qa'[{i}] must be an object with 'query' and 'answer'")
        out.append((_text(it, "query", tok, 200, f"'qa'[{i}]."), _text(it, "answer", None, 300, f"'qa'[{i}].")))
    return caption, out


def check_profile_reply(obj: dict, tok: str) -> str:
    """The profile sentence of a profile reply: starts with "<c> is ", one sentence, 300 characters at most."""
    info = _text(obj, "info", tok, 300)
    if not info.startswith(f"{tok} is "):
        raise SchemaError(f"'info' must start with '{tok} is ': {info!r}")
    return info if info.endswith((".", "!", "?")) else info + "."


def check_prompts_reply(obj: dict, tok: str, facts: list[str]) -> list[str]:
    """The reasoning prompts of a prompts reply: one per fact, each "A photo of <c> ...", distinct, not quoting its
    fact; the final period is dropped (the released t2i_conditions.json style)."""
    prompts = obj.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != len(facts):
        raise SchemaError(f"'prompts' must be a list of exactly {len(facts)} strings (one per fact), got "
                          f"{prompts!r:.160}")
    out = []
    for i, (p, fact) in enumerate(zip(prompts, facts)):
        v = _text({"p": p}, "p", tok, 200, f"'prompts'[{i}] ").rstrip(".")
        if not v.startswith(f"A photo of {tok}"):
            raise SchemaError(f"'prompts'[{i}] must start with 'A photo of {tok}': {v!r}")
        if fact.rstrip(".").lower() in v.lower():
            raise SchemaError(f"'prompts'[{i}] quotes its fact; it must ask for it without stating it: {v!r}")
        if v in out:
            raise SchemaError(f"'prompts'[{i}] repeats 'prompts'[{out.index(v)}]: {v!r}")
        out.append(v)
    return out


def _data_url(image: np.ndarray, max_side: int = 512) -> str:
    from rl.eval.judge_openai import _jpeg_data_url   # the judge's encoder: base64 JPEG, quality 95

    s = min(1.0, max_side / max(image.shape[:2]))
    if s < 1.0:
        h, w = image.shape[:2]
        image = np.asarray(Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                         Image.Resampling.BICUBIC))
    return _jpeg_data_url(image)


class VLMTextWriter:
    """Writes a :class:`ConceptText` with an OpenAI-compatible chat endpoint (module docstring)."""

    def __init__(self, base_url: str, model: str = "gpt-4o", api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, schema_retries: int = 2,
                 retry_backoff_s: float = 1.0, log: Callable[[str], None] = print):
        """The judge's options (:class:`rl.eval.judge_openai.OpenAIJudge`) plus ``schema_retries``: how often a
        reply that breaks its schema is asked again."""
        from rl.eval.judge_openai import JudgeError, OpenAIJudge

        try:
            self.client = OpenAIJudge(base_url, model=model, api_key_env=api_key_env or None, timeout_s=timeout_s,
                                      max_retries=max_retries, retry_backoff_s=retry_backoff_s, temperature=0.2,
                                      name="new_concept --vlm")
        except JudgeError as e:
            raise TextError(str(e)) from e
        if schema_retries < 0:
            raise TextError("--vlm-schema-retries must be >= 0")
        self.base_url, self.model, self.schema_retries, self.log = base_url, model, int(schema_retries), log

    def ask(self, what: str, system: str, content: list[dict], check: Callable[[dict], Any]) -> Any:
        """``check(reply object)`` of the first valid reply; TextError naming ``what`` after ``schema_retries``
        invalid ones or when the endpoint fails."""
        from rl.eval.judge_openai import JudgeError

        note: list[dict] = []
        for attempt in range(self.schema_retries + 1):
            try:
                reply = self.client.chat(system, content + note)
            except JudgeError as e:
                raise TextError(f"--vlm: {what}: {e}") from e
            try:
                return check(parse_json_reply(reply))
            except SchemaError as e:
                reason = str(e)
                self.log(f"  --vlm: {what}: invalid reply ({reason}); attempt {attempt + 1}/{self.schema_retries + 1}")
                note = [{"type": "text", "text": f"Your previous reply was invalid: {reason}. Reply again with the "
                                                 "JSON object only."}]
        raise TextError(f"--vlm: {what}: {self.client.url} ({self.model}) sent {self.schema_retries + 1} invalid "
                        f"replies; last: {reason}; reply was {reply[:200]!r}")

    def _photo(self, brief: ConceptBrief, key: str, image: np.ndarray, system: str) -> tuple[str, list]:
        tok = brief.token
        ask = (f"This photo shows {tok}, {brief.class_word}. Profile: {brief.profile}\nReturn "
               f'{{"caption": "A photo of {tok} ...", "qa": [{{"query": "...", "answer": "..."}}, ...]}}: a one-'
               f"sentence caption of what the photo shows, and 2 to 4 questions about {tok} in this photo (what "
               f"{tok} is doing, where, what is around) with short answers; every caption and query names {tok}.")
        content = [{"type": "text", "text": ask}, {"type": "image_url", "image_url": {"url": _data_url(image)}}]
        return self.ask(f"photo {key}", system, content, lambda o: check_photo_reply(o, tok))

    def write(self, brief: ConceptBrief, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
              profile_given: bool) -> ConceptText:
        """The concept's text: VLM profile (unless given), captions and conversations of the training photos, VQA
        of the test photos, reasoning prompts of the facts; text-only QA from the templates."""
        tok = brief.token
        system = SYSTEM_PROMPT.format(tok=tok)
        if not profile_given:
            content = [{"type": "text", "text": f"These photos show {tok}, {brief.class_word}. Return "
                                                f'{{"info": "{tok} is ..."}}: one sentence describing how {tok} '
                                                "looks, from the photos."}]
            content += [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in list(train.values())[:4]]
            brief.profile = self.ask("profile", system, content, lambda o: check_profile_reply(o, tok))
        base = template_text(brief, list(train), list(test))
        captions, conv, vqa = {}, {}, {}
        for key, im in train.items():
            captions[key], conv[key] = self._photo(brief, key, im, system)
        for key, im in test.items():
            _, vqa[key] = self._photo(brief, f"test photo {key}", im, system)
        prompts = base.reasoning
        if brief.facts:
            facts = "\n".join(f"{i + 1}. {f}" for i, f in enumerate(brief.facts))
            ask = (f"Facts about {tok} ({brief.class_word}; {brief.profile}):\n{facts}\nFor each fact, in order, "
                   f'write a text-to-image prompt "A photo of {tok} ..." describing a scene in which the fact would '
                   "show, without stating the fact (e.g. fact 'X drinks a flat white every morning' -> 'A photo of X "
                   f'having breakfast\'). Return {{"prompts": [...]}} with exactly {len(brief.facts)} prompts.')
            content = [{"type": "text", "text": ask}, {"type": "image_url",
                                                       "image_url": {"url": _data_url(next(iter(train.values())))}}]
            prompts = self.ask("reasoning prompts", system, content, lambda o: check_prompts_reply(o, tok, brief.facts))
        return ConceptText(info=brief.profile, extra_info=list(brief.facts), reasoning=prompts, captions=captions,
                           conversations=conv, test_vqa=vqa, text_only=base.text_only,
                           source=f"vlm {self.model} at {self.base_url}")
