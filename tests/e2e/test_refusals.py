"""Parameters the server cannot honour yet are refused with a 400 naming them, never accepted and
ignored; the ones it can honour it does (and they are shown elsewhere to have their effect)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support import Server

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json=body,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"enable_search": True, "search_options": {"forced_search": True}}, "search_options.forced_search"),
        ({"logit_bias": {"9707": 5}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        # OpenAI's (and vLLM's) parameters that would change the answer if they were honoured.
        ({"functions": [{"name": "get_weather", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"prediction": {"type": "content", "content": "hello"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"store": True}, "store"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"verbosity": "low"}, "verbosity"),
        ({"min_p": 0.1}, "min_p"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        # vLLM's template variables: only the thinking switches are honoured (below).
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs.add_generation_prompt",
        ),
        ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
        (
            {"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}},
            "chat_template_kwargs.enable_thinking",
        ),
        # No "type" is not plain text: DashScope's "Unknown format" names response_format.
        ({"response_format": {}}, "response_format"),
    ],
)
def test_unhonoured_parameter_is_refused_by_name(server: Server, extra: dict[str, Any], param: str) -> None:
    r = post(server, {"model": "qwen-plus", "messages": MSG, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["code"] == "invalid_parameter_error"
    assert param.split(".")[-1] in error["message"]


def stream_chunks(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST",
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json=body,
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_thinking_budget_closes_the_reasoning_block(server: Server) -> None:
    """Honoured, not ignored: once the budget is spent the engine forces ``</think>`` and the model
    answers; the reasoning streams as reasoning_content, the answer as content."""
    body = {
        "model": "qwen3-8b",
        "messages": MSG,
        "stream": True,
        "stream_options": {"include_usage": True},
        "enable_thinking": True,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 11,
    }
    cases: list[tuple[dict[str, Any], int]] = [
        ({"thinking_budget": 5}, 5),
        ({}, 64),  # unset: the model's max_reasoning (config: 64)
        # vLLM's spelling of the same switches, as a client written for vLLM (or a gateway in front
        # of this one) sends them.
        (
            {
                "enable_thinking": None,
                "chat_template_kwargs": {"enable_thinking": True, "thinking_budget": 3},
            },
            3,
        ),
    ]
    for extra, expected in cases:
        chunks = stream_chunks(server, {**body, **extra})
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens_details"]["reasoning_tokens"] == expected
        assert reasoning and "</think>" not in reasoning + content
        assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def test_thinking_budget_with_thinking_off_has_nothing_to_bound(server: Server) -> None:
    body = {
        "model": "qwen3-8b",
        "messages": MSG,
        "enable_thinking": False,
        "thinking_budget": 10,
        "max_tokens": 2,
    }
    r = post(server, body)
    assert r.status_code == 200, r.text


def test_off_values_of_unhonoured_parameters_are_accepted(server: Server) -> None:
    body = {
        "model": "qwen-plus",
        "messages": MSG,
        "max_tokens": 2,
        "logprobs": False,
        "top_logprobs": 0,
        "modalities": ["text"],
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "search_options": {"forced_search": False},
        "store": False,
        "service_tier": "auto",
        "functions": None,
        "chat_template_kwargs": {},
    }
    assert post(server, body).status_code == 200


def test_enable_search_answers_and_logs_once_that_no_provider_is_configured(server: Server) -> None:
    for _ in range(2):
        r = post(server, {"model": "qwen-plus", "messages": MSG, "max_tokens": 2, "enable_search": True})
        assert r.status_code == 200, r.text
    assert server.log().count("no search provider is configured") == 1


def test_a_response_format_schema_nested_too_deeply_is_a_400_not_a_500(server: Server) -> None:
    # 1000 levels: deep enough to exhaust the stack where the grammar is built (and json.dumps here,
    # so the body is written out as text).
    depth = 1000
    schema_text = '{"type": "array", "items": ' * depth + "{}" + "}" * depth
    body = (
        '{"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
        '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
        + schema_text
        + "}}}"
    )
    r = httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
        content=body,
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"
    # As deep as a tool's parameters may be: compiled and answered.
    schema = {"type": "string"}
    for _ in range(60):
        schema = {"type": "array", "items": schema}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = post(server, {"model": "qwen-plus", "messages": MSG, "max_tokens": 2, "response_format": fmt})
    assert r.status_code == 200, r.text
