"""A judge for any OpenAI-compatible chat-completions endpoint (GPT-4o as in the paper, or a local VLM server such
as vLLM), with the released judge prompts. Registered in :mod:`rl.eval.judge` as ``"openai"``::

    eval:
      judge: openai
      judge_options: {base_url: "https://api.openai.com/v1", model: gpt-4o, api_key_env: OPENAI_API_KEY}

* Dense Rea. (:meth:`OpenAIJudge.answer_score`): ``eval/eval_p_mmu.py``'s evaluator prompt (score 0 / 0.5 / 1 of a
  predicted answer against the reference; the released code sent it to DeepSeek-chat).
* Dense Gen. (:meth:`OpenAIJudge.image_score`): ``eval/4o_judge_t2i.py``'s prompt (concept name, info and
  extra_info, the generation prompt and the image; score 0 / 0.5 / 1), the image as a base64 JPEG (quality 95) as
  ``eval/api.py`` sends it, temperature 1e-5.

Requests time out after ``timeout_s``; connection errors, time-outs, HTTP 429 and 5xx are retried ``max_retries``
times with exponential back-off; any other HTTP error, or an answer that is not a score in [0, 1], is an error
naming the judge, the endpoint and the reply. Never required: without ``eval.judge`` the metrics are "not computed".
"""
from __future__ import annotations

import base64
import io
import logging
import os
import re
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["OpenAIJudge", "JudgeError", "ANSWER_SYSTEM_PROMPT", "IMAGE_SYSTEM_PROMPT", "answer_user_prompt",
           "image_user_prompt", "concept_info_text", "parse_score"]

ANSWER_SYSTEM_PROMPT = """You are a score evaluator. Given a question, an answer, and a predicted answer, you need to give a score.
    The range is <0, 0.5, 1.0>, where 0 means the answer is completely irrelevant, 1 means the answer is completely relevant, and 0.5 means the answer is partially relevant.
    You need to ignore grammar and only focus on whether the correct content is answered.
    For example, if asked 'What color dress do you like?', the answer is 'I like blue dresses',
    and the predicted answer is 'blue' or 'the favorite color is blue', your evaluation score should be 1.0 in both cases.
    """  # noqa: E501
"""eval/eval_p_mmu.py's evaluator system prompt, whitespace included."""

IMAGE_SYSTEM_PROMPT = """
                         You are an expert in evaluating model-generated images. This evaluation mainly assesses whether T2I generated images match the given concept description's extra_info.
                         The concept description format is as follows:
                         name: <concept name>
                         info: <concept description>
                         extra_info: <additional information>
                         You need to evaluate whether the generated image matches the description based on extra_info and the prompt used to generate the image, giving a score of 0, 0.5, or 1, where 0 means does not match, 0.5 means partially matches, and 1 means matches.
                         For example: If the extra_info of concept <bingbing> is that he has a red dress, and the generated image prompt is "A photo of <bingbing> wearing her dress.", if there is a red dress in the image, you should give a score of 1, otherwise give a score of 0.
                         You only need to give the score, no explanation needed.
                         """  # noqa: E501
"""eval/4o_judge_t2i.py's system prompt, whitespace included."""


class JudgeError(ValueError):
    """The judge endpoint failed or answered something that is not a score."""


def answer_user_prompt(question: str, reference: str, answer: str) -> str:
    """eval_p_mmu.py's user prompt of the evaluator."""
    return (f"Question: {question}, Answer: {reference}, Predicted answer: {answer}. Please give a score and don't "
            "make any other responses.")


def concept_info_text(name: str, info: str, extra_info: list[str]) -> str:
    """4o_judge_t2i.py's concept block: ``name: <c>\\ninfo: ...\\nextra_info: a b c\\n``."""
    out = f"name: <{name}>\n" + f"info: {info}" + "\n" + "extra_info: "
    for idx, item in enumerate(extra_info):
        out += item + (" " if idx != len(extra_info) - 1 else "\n")
    return out


def image_user_prompt(concept_info: str, prompt: str) -> str:
    """4o_judge_t2i.py's user prompt."""
    return ("Concept Information:\n" + concept_info + "\n" + "Generated image prompt:\n" + prompt + "\n"
            + "Please give a score according to the rules, no explanation needed.\n" + "Score:")


_NUMBER = re.compile(r"[-+]?\d*\.?\d+")


def parse_score(text: str, judge: str = "openai") -> float:
    """The score in a reply: the number after the last ``Score::`` / ``Score:`` if any (eval_p_mmu.py splits on
    ``"Score::"``), else the reply's only number; JudgeError unless it is in [0, 1]."""
    tail = re.split(r"Score::?", text)[-1]
    numbers = _NUMBER.findall(tail)
    if len(numbers) != 1:
        raise JudgeError(f"judge {judge!r}: expected one score in [0, 1], got the reply {text!r}")
    value = float(numbers[0])
    if not 0.0 <= value <= 1.0:
        raise JudgeError(f"judge {judge!r}: score {value} outside [0, 1] in the reply {text!r}")
    return value


def _jpeg_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").save(buf, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIJudge:
    """Dense Rea. / Dense Gen. judge over an OpenAI-compatible ``/chat/completions`` endpoint (module docstring)."""

    def __init__(self, base_url: str, model: str = "gpt-4o", api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, retry_backoff_s: float = 1.0,
                 max_tokens: int = 2000, temperature: float = 1e-5, name: str = "openai"):
        """``base_url``: the API root (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``); ``api_key_env``:
        the environment variable holding the key (None: no key, e.g. a local server)."""
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge {name!r}: judge_options.base_url must be an http(s) URL, got {base_url!r}")
        if timeout_s <= 0 or max_retries < 0:
            raise JudgeError(f"judge {name!r}: timeout_s must be > 0 and max_retries >= 0")
        self.name = name
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.max_retries = model, float(timeout_s), int(max_retries)
        self.retry_backoff_s, self.max_tokens, self.temperature = float(retry_backoff_s), int(max_tokens), temperature
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise JudgeError(f"judge {name!r}: the environment variable {api_key_env} (judge_options.api_key_env) "
                                 "is not set")

    # -- transport ----------------------------------------------------------------------------------------------
    def chat(self, system: str, content: list[dict[str, Any]]) -> str:
        """One chat completion; the reply's text. Retries as in the module docstring."""
        import requests

        payload = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                     {"role": "user", "content": content}],
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                r = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("judge %s: %s (attempt %d/%d)", self.name, last, attempt + 1, self.max_retries + 1)
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                log.warning("judge %s: %s (attempt %d/%d)", self.name, last, attempt + 1, self.max_retries + 1)
                continue
            if r.status_code != 200:
                raise JudgeError(f"judge {self.name!r}: {self.url} answered HTTP {r.status_code}: {r.text[:300]}")
            try:
                return str(r.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise JudgeError(f"judge {self.name!r}: {self.url} sent no chat completion: {r.text[:300]}") from exc
        raise JudgeError(f"judge {self.name!r}: {self.url} failed {self.max_retries + 1} time(s); last: {last}")

    # -- the Judge protocol (rl.eval.judge) ---------------------------------------------------------------------------
    def answer_score(self, question: str, answer: str, reference: str) -> float:
        """Dense Rea.: eval_p_mmu.py's evaluator on (question, reference, predicted answer)."""
        reply = self.chat(ANSWER_SYSTEM_PROMPT, [{"type": "text", "text": answer_user_prompt(question, reference,
                                                                                              answer)}])
        return parse_score(reply, self.name)

    def image_score(self, image: np.ndarray, prompt: str, concept_info: str) -> float:
        """Dense Gen.: 4o_judge_t2i.py's prompt on the image, its generation prompt and the concept block
        (:func:`concept_info_text`)."""
        content = [{"type": "text", "text": image_user_prompt(concept_info, prompt)},
                   {"type": "image_url", "image_url": {"url": _jpeg_data_url(image)}}]
        return parse_score(self.chat(IMAGE_SYSTEM_PROMPT, content), self.name)

    def segment_scores(self, image: np.ndarray, segments: list[str]) -> list[float]:
        """Per prompt segment, the 4o judge's score of the image against that segment (no concept block)."""
        return [self.image_score(image, seg, "") for seg in segments]
