"""Tool calls and thinking through the real server and the openai SDK, on the tiny checkpoints.

Random weights don't call tools on their own, so the wire shapes of free answers are checked on
whatever the model writes, and real calls come from a named ``tool_choice`` (decoding constrained to
the tool's schema): the seed's get_current_weather request gets the seed's response shape, streaming and
not, and the streamed deltas join to a call like the non-stream one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openai import BadRequestError, OpenAI

from tests.support import MODELS, Server, assert_schema, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{models}/tiny-qwen2.5"
max_output = 64

[[models]]
id = "qwen3-8b"
path = "{models}/tiny-qwen3"
max_output = 64
max_reasoning = 48

# A thinking-by-default id that answers non-stream calls too (DashScope's qwen3.5-plus).
[[models]]
id = "qwen3.5-plus"
path = "{models}/tiny-qwen3"
max_output = 16
max_reasoning = 24

# An always-thinking, stream-only id on a checkpoint without thinking markup of its own: the engine
# opens <think> in the prompt and forces the close (as plain tokens: this vocabulary has no <think>).
[[models]]
id = "qwq-plus"
path = "{models}/tiny-qwen2.5"
max_output = 16
max_reasoning = 24

[[models]]
id = "qvq-max"
path = "{models}/tiny-qwen2.5"
max_output = 16
max_reasoning = 24
"""

# The seed's tools (seeds/002), get_current_time with an empty parameters object.
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_time",
            "description": "当你想知道现在的时间时非常有用。",
            "parameters": {},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "当你想查询指定城市的天气时非常有用。",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "城市或县区,比如北京市、杭州市、余杭区等。"}
                },
                "required": ["location"],
            },
        },
    },
]
# Random weights never end a free string on their own: calls forced by a named tool_choice use the seed's
# weather tool with the location bounded (the constraint enforces maxLength), so they finish.
BOUNDED = json.loads(json.dumps(TOOLS))
BOUNDED[1]["function"]["parameters"]["properties"]["location"]["maxLength"] = 6
WEATHER_SCHEMA = BOUNDED[1]["function"]["parameters"]
MSG = [{"role": "user", "content": "杭州天气怎么样"}]
VARIED = {"temperature": 1.0, "top_p": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("tools-home")
    config = home / "config.toml"
    config.write_text(CONFIG.format(models=MODELS))
    server = start_server(home, "--config", str(config))
    yield server
    server.stop()


def sdk(server: Server) -> OpenAI:
    return OpenAI(api_key=server.api_key, base_url=server.compat_url, max_retries=0, timeout=120)


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json=body,
        timeout=120,
    )


def chunks_of(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST",
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={**body, "stream": True},
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for c in chunks:
        if c.get("choices"):
            assert_schema(c, "CreateChatCompletionStreamResponse")
    return chunks


def joined_calls(chunks: list[dict[str, Any]]) -> list[dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for choice in c.get("choices", []):
            for tc in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                if tc.get("id"):
                    assert not call["id"]
                    call["id"] = tc["id"]
                assert tc["type"] == "function"
                call["name"] += tc["function"].get("name") or ""
                call["arguments"] += tc["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


# -- tools ---------------------------------------------------------------------------------------------


# (tiny-qwen3-vl joins these once the local engine loads VL checkpoints; its template's tool markup is
# the same Hermes format.)
@pytest.mark.parametrize("model", ["qwen-plus", "qwen3-8b"])
def test_free_answers_with_tools_have_the_right_shape(srv: Server, model: str) -> None:
    body = {
        "model": model,
        "enable_thinking": False,
        "messages": MSG,
        "tools": TOOLS,
        "max_tokens": 12,
        **VARIED,
    }
    r = post(srv, body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert_schema(data, "CreateChatCompletionResponse")
    choice = data["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    chunks = chunks_of(srv, body)
    assert chunks[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}


@pytest.mark.parametrize("model", ["qwen-plus", "qwen3-8b"])
def test_named_tool_choice_returns_the_seeds_shape(srv: Server, model: str) -> None:
    completion = sdk(srv).chat.completions.create(
        model=model,
        extra_body={"enable_thinking": False},
        messages=MSG,  # type: ignore[arg-type]
        tools=BOUNDED,  # type: ignore[arg-type]
        tool_choice=named("get_current_weather"),
        max_tokens=64,
        **VARIED,  # type: ignore[arg-type]
    )
    raw = completion.model_dump()
    choice = raw["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "" and message["role"] == "assistant"
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_current_weather"
    assert call["id"].startswith("call_") and len(call["id"]) == 27
    args = json.loads(call["function"]["arguments"])
    assert not list(Draft202012Validator(WEATHER_SCHEMA).iter_errors(args))
    assert raw["usage"]["completion_tokens"] > 0


def test_named_tool_choice_streams_in_dashscopes_delta_shape(srv: Server) -> None:
    body = {
        "model": "qwen3-8b",
        "messages": MSG,
        "tools": BOUNDED,
        "tool_choice": named("get_current_weather"),
        "enable_thinking": False,
        "max_tokens": 64,
        **VARIED,
    }
    chunks = chunks_of(srv, body)
    deltas = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls") or []]
    assert len(deltas) > 2  # the arguments arrive in pieces
    first, rest = deltas[0], deltas[1:]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_current_weather"
    assert all(d["index"] == 0 and d["id"] == "" and "name" not in d["function"] for d in rest)
    finish = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert [f["finish_reason"] for f in finish] == ["tool_calls"]
    (call,) = joined_calls(chunks)
    assert not list(Draft202012Validator(WEATHER_SCHEMA).iter_errors(json.loads(call["arguments"])))
    # The same seeded request, not streamed, holds the same call (ids differ: each answer has its own).
    r = post(srv, body)
    assert r.status_code == 200, r.text
    (same,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert (same["function"]["name"], same["function"]["arguments"]) == (call["name"], call["arguments"])


def test_a_call_without_parameters_gets_an_empty_object(srv: Server) -> None:
    body = {"model": "qwen-plus", "messages": MSG, "tools": TOOLS, "tool_choice": named("get_current_time")}
    r = post(srv, {**body, **VARIED, "max_tokens": 32})
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["arguments"] == "{}"


def test_tool_choice_none_leaves_the_tools_out(srv: Server) -> None:
    plain = post(srv, {"model": "qwen-plus", "messages": MSG, "max_tokens": 1})
    none = post(
        srv, {"model": "qwen-plus", "messages": MSG, "tools": TOOLS, "tool_choice": "none", "max_tokens": 1}
    )
    auto = post(srv, {"model": "qwen-plus", "messages": MSG, "tools": TOOLS, "max_tokens": 1})
    assert none.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    assert auto.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]


def test_tool_results_round_trip_into_the_template(srv: Server) -> None:
    from transformers import AutoTokenizer

    calls = [
        {
            "id": "call_cec4c19d27624537b583af",
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": '{"location": "杭州市"}'},
        }
    ]
    msgs = [
        *MSG,
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "杭州市 大部多云，摄氏 18 度", "tool_call_id": calls[0]["id"]},
    ]
    r = post(srv, {"model": "qwen-plus", "messages": msgs, "tools": TOOLS, "max_tokens": 1})
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(str(MODELS / "tiny-qwen2.5"))
    rendered = [
        {
            **m,
            "tool_calls": [
                {**c, "function": {**c["function"], "arguments": {"location": "杭州市"}}}
                for c in m["tool_calls"]
            ],
        }
        if "tool_calls" in m
        else m
        for m in msgs
    ]
    text = tok.apply_chat_template(rendered, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>" in text and '"location": "杭州市"' in text
    assert r.json()["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"messages": [{"role": "tool", "content": "18 度", "tool_call_id": "call_1"}]},
            "messages.0.role",
            'messages with role "tool" must be a response to a preceeding message with "tool_calls"',
        ),
        (
            {"tool_choice": "required"},
            "tool_choice",
            'tool_choice is one of the strings that should be ["none", "auto"]',
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "search", "parameters": {}}}]},
            "tools.0",
            "Tool names are not allowed to be [search]",
        ),
    ],
)
def test_tool_refusals(srv: Server, body: dict[str, Any], param: str, message: str) -> None:
    r = post(srv, {"model": "qwen-plus", "messages": MSG, "tools": TOOLS, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["message"]) == (param, message)


# -- thinking ------------------------------------------------------------------------------------------


def test_reasoning_streams_first_in_dashscopes_shape(srv: Server) -> None:
    body = {
        "model": "qwen3-8b",
        "messages": MSG,
        "stream_options": {"include_usage": True},
        "thinking_budget": 6,
        "max_tokens": 5,
        **VARIED,
    }
    chunks = chunks_of(srv, body)
    assert chunks[0]["choices"][0]["delta"] == {"content": None, "role": "assistant", "reasoning_content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]][1:]
    kinds = [
        "reasoning" if d.get("reasoning_content") else "content"
        for d in deltas
        if d.get("reasoning_content") or d.get("content")
    ]
    assert (
        kinds and kinds[0] == "reasoning" and kinds == sorted(kinds, reverse=True)
    )  # reasoning, then answer
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {"content": "", "reasoning_content": None}
    usage = chunks[-1]["usage"]
    # The budget caps the reasoning; max_tokens caps the answer alone (after "\n</think>").
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 6
    if finish["finish_reason"] == "length":
        assert usage["completion_tokens"] == 6 + 2 + 5


def test_non_stream_reasoning_equals_the_streamed_one(srv: Server) -> None:
    body = {"model": "qwen3.5-plus", "messages": MSG, "thinking_budget": 5, "max_tokens": 6, **VARIED}
    r = post(srv, body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert_schema(data, "CreateChatCompletionResponse")
    message = data["choices"][0]["message"]
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5
    chunks = chunks_of(srv, {**body, "stream_options": {"include_usage": True}})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert message["reasoning_content"] == "".join(d.get("reasoning_content") or "" for d in deltas) != ""
    assert message["content"] == "".join(d.get("content") or "" for d in deltas)
    assert chunks[-1]["usage"] == data["usage"]


def test_thinking_off_answers_without_reasoning(srv: Server) -> None:
    completion = sdk(srv).chat.completions.create(
        model="qwen3-8b",
        messages=MSG,
        max_tokens=4,
        extra_body={"enable_thinking": False},
        **VARIED,  # type: ignore[arg-type]
    )
    raw = completion.model_dump()
    assert "reasoning_content" not in raw["choices"][0]["message"]
    assert (raw["usage"].get("completion_tokens_details") or {}).get("reasoning_tokens") in (None, 0)


def test_always_thinking_model_without_markup_of_its_own(srv: Server) -> None:
    """qwq-plus on tiny-qwen2.5: the engine opens <think>; the budget closes it with plain tokens."""
    body = {
        "model": "qwq-plus",
        "messages": MSG,
        "stream_options": {"include_usage": True},
        "max_tokens": 3,
        **VARIED,
    }
    for budget, expected in ((4, 4), (None, 24)):
        extra = {} if budget is None else {"thinking_budget": budget}
        chunks = chunks_of(srv, {**body, **extra})
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert deltas[0] == {"content": None, "role": "assistant", "reasoning_content": ""}
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
        assert reasoning and "think>" not in reasoning + content
        assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == expected


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "qwq-plus",
            "This model only support stream mode, please enable the stream parameter to access the model. ",
        ),
        ("qvq-max", "current user api does not support http call"),
    ],
)
def test_stream_only_reasoning_models_refuse_non_stream(srv: Server, model: str, message: str) -> None:
    with pytest.raises(BadRequestError) as info:
        sdk(srv).chat.completions.create(model=model, messages=MSG)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.body["message"] == message  # type: ignore[index]


def test_always_thinking_refuses_enable_thinking_false(srv: Server) -> None:
    r = post(srv, {"model": "qwq-plus", "messages": MSG, "stream": True, "enable_thinking": False})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "The value of the enable_thinking parameter is restricted to True."


def test_thinking_budget_above_the_models_reasoning_length(srv: Server) -> None:
    r = post(srv, {"model": "qwen3-8b", "messages": MSG, "stream": True, "thinking_budget": 49})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "thinking_budget"
    assert (
        error["message"] == "The thinking_budget parameter must be a positive integer and not greater than 48"
    )


def test_past_reasoning_is_not_fed_back(srv: Server) -> None:
    history = [
        *MSG,
        {"role": "assistant", "content": "晴", "reasoning_content": "用户问天气。" * 20},
        {"role": "user", "content": "明天呢"},
    ]
    with_reasoning = post(
        srv, {"model": "qwen3-8b", "messages": history, "enable_thinking": False, "max_tokens": 1}
    )
    without = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in history]
    plain = post(srv, {"model": "qwen3-8b", "messages": without, "enable_thinking": False, "max_tokens": 1})
    assert with_reasoning.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
