"""The OpenAI-compatible judge (rl.eval.judge_openai) against a small chat-completions server on loopback started here:
the released prompts on the wire, key and model, retries on 5xx / time-outs, clear errors on bad answers."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rl.eval.judge import build_judge
from rl.eval.judge_openai import (
    ANSWER_SYSTEM_PROMPT,
    IMAGE_SYSTEM_PROMPT,
    JudgeError,
    OpenAIJudge,
    concept_info_text,
    parse_score,
)


class FakeChatServer:
    """Answers POST /v1/chat/completions with the next scripted (status, reply text, delay_s); records requests."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text, delay = outer.script.pop(0) if outer.script else (200, "1", 0.0)
                time.sleep(delay)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                  if status == 200 else {"error": text}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_released_prompts_key_and_model_on_the_wire(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    with FakeChatServer([(200, "Score:: 0.5", 0.0), (200, "1", 0.0)]) as srv:
        judge = build_judge("openai", base_url=srv.url, model="gpt-4o", api_key_env="JUDGE_TEST_KEY")
        assert judge.answer_score("What does <bo> drink?", "a latte", "<bo> drinks a flat white.") == 0.5
        img = np.zeros((16, 16, 3), np.uint8)
        block = concept_info_text("bo", "<bo> is a man.", ["<bo> drinks a flat white.", "<bo> plays the violin."])
        assert judge.image_score(img, "A photo of <bo> having breakfast", block) == 1.0
    a, b = srv.requests
    assert a["path"] == "/v1/chat/completions" and a["auth"] == "Bearer sk-test" and a["body"]["model"] == "gpt-4o"
    assert a["body"]["messages"][0] == {"role": "system", "content": ANSWER_SYSTEM_PROMPT}
    assert a["body"]["messages"][1]["content"][0]["text"] == (
        "Question: What does <bo> drink?, Answer: <bo> drinks a flat white., Predicted answer: a latte. Please give a "
        "score and don't make any other responses.")
    assert b["body"]["messages"][0]["content"] == IMAGE_SYSTEM_PROMPT and b["body"]["temperature"] == 1e-5
    text, image = b["body"]["messages"][1]["content"]
    assert text["text"] == ("Concept Information:\nname: <bo>\ninfo: <bo> is a man.\nextra_info: <bo> drinks a flat "
                            "white. <bo> plays the violin.\n\nGenerated image prompt:\nA photo of <bo> having breakfast"
                            "\nPlease give a score according to the rules, no explanation needed.\nScore:")
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_retries_on_server_errors_and_timeouts_then_fails_clearly():
    with FakeChatServer([(503, "overloaded", 0.0), (200, "0", 0.0)]) as srv:
        judge = OpenAIJudge(srv.url, api_key_env=None, retry_backoff_s=0.01)
        assert judge.answer_score("q", "a", "r") == 0.0
        assert len(srv.requests) == 2 and srv.requests[0]["auth"] is None
    with FakeChatServer([(200, "1", 2.0)] * 3) as srv:
        judge = OpenAIJudge(srv.url, api_key_env=None, timeout_s=0.3, max_retries=1, retry_backoff_s=0.01)
        with pytest.raises(JudgeError, match=r"failed 2 time\(s\); last: ReadTimeout"):
            judge.answer_score("q", "a", "r")
    with FakeChatServer([(401, "bad key", 0.0)]) as srv:
        judge = OpenAIJudge(srv.url, api_key_env=None)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.answer_score("q", "a", "r")
        assert len(srv.requests) == 1   # a client error is not retried


def test_bad_answers_and_bad_options_are_clear_errors(monkeypatch):
    with FakeChatServer([(200, "I think it matches well.", 0.0), (200, "Score:: 7", 0.0)]) as srv:
        judge = OpenAIJudge(srv.url, api_key_env=None)
        with pytest.raises(JudgeError, match="expected one score"):
            judge.answer_score("q", "a", "r")
        with pytest.raises(JudgeError, match="outside"):
            judge.answer_score("q", "a", "r")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_KEY_VAR"):
        OpenAIJudge("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(JudgeError, match="base_url"):
        OpenAIJudge("127.0.0.1:9", api_key_env=None)
    assert parse_score("0.5") == 0.5 and parse_score("Score:: 1.0") == 1.0 and parse_score("Score: 0") == 0.0
