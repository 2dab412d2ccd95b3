"""logprobs / top_logprobs through the real server: OpenAI's shape (validated against the published
spec), streamed and not, and the values are the model's raw distribution."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support import Server, assert_schema

MSG = [{"role": "user", "content": "Tell me about the sea."}]
# Greedy and no penalty: the chosen token is then the raw distribution's most likely one.
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-plus", "messages": MSG, "max_tokens": 8, **body},
        timeout=120,
    )


def stream_chunks(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST",
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-plus", "messages": MSG, "max_tokens": 8, "stream": True, **body},
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def check_entries(entries: list[dict[str, Any]], content: str, top: int) -> None:
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == content
    for e in entries:
        assert e["logprob"] <= 0.0 and math.isfinite(e["logprob"])
        assert len(e["top_logprobs"]) == top
        values = [t["logprob"] for t in e["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        for t in e["top_logprobs"]:
            assert bytes(t["bytes"]).decode(errors="replace") == t["token"]


def test_logprobs_non_stream(server: Server) -> None:
    r = post(server, {"logprobs": True, "top_logprobs": 3, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_schema(body, "CreateChatCompletionResponse")
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    # One entry per answer token (an ending EOS is no answer text and has none).
    ended = 1 if choice["finish_reason"] == "stop" else 0
    assert len(entries) == body["usage"]["completion_tokens"] - ended
    check_entries(entries, choice["message"]["content"], 3)
    for e in entries:  # greedy on the raw distribution: the pick is its own top alternative
        assert e["top_logprobs"][0]["token"] == e["token"]
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])


def test_logprobs_stream_matches_non_stream(server: Server) -> None:
    body = {"logprobs": True, "top_logprobs": 2, **GREEDY}
    plain = post(server, body).json()["choices"][0]
    chunks = stream_chunks(server, body)
    entries: list[dict[str, Any]] = []
    text = ""
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            if choice["logprobs"] is not None:
                entries += choice["logprobs"]["content"]
    assert text == plain["message"]["content"]
    check_entries(entries, text, 2)
    assert [e["token"] for e in entries] == [e["token"] for e in plain["logprobs"]["content"]]
    for a, b in zip(entries, plain["logprobs"]["content"], strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_logprobs_without_top_logprobs_and_through_the_sdk(server: Server) -> None:
    client = OpenAI(base_url=server.compat_url, api_key=server.api_key, max_retries=0)
    r = client.chat.completions.create(model="qwen-plus", messages=MSG, max_tokens=4, logprobs=True, seed=1)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(t.top_logprobs == [] for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    off = client.chat.completions.create(model="qwen-plus", messages=MSG, max_tokens=4)
    assert off.choices[0].logprobs is None


def test_logprobs_with_a_constraint(server: Server) -> None:
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    r = post(server, {"logprobs": True, "top_logprobs": 1, "response_format": fmt, "max_tokens": 30})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    check_entries(choice["logprobs"]["content"], choice["message"]["content"], 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"logprobs": True, "top_logprobs": 6},
            "Invalid 'top_logprobs': 6. Expected an integer in range [0, 5]",
        ),
        (
            {"logprobs": True, "top_logprobs": -1},
            "Invalid 'top_logprobs': -1. Expected an integer in range [0, 5]",
        ),
        ({"top_logprobs": 2}, "top_logprobs requires logprobs to be true."),
    ],
)
def test_bad_top_logprobs(server: Server, body: dict[str, Any], message: str) -> None:
    r = post(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == message
    assert r.json()["error"]["param"] == "top_logprobs"
