"""Structured output through the real server and the openai SDK, on tiny checkpoints with random
weights: ``response_format`` json_schema / json_object and a named ``tool_choice`` are enforced by the
engine's grammar, so even meaningless weights produce output that parses and validates.

Every test schema bounds its strings and arrays: a random model inside an unbounded string almost
never picks the closing quote, and would run to ``max_tokens`` (then ``finish_reason`` is "length" and
the output is an unfinished prefix; see test_json_object_is_constrained_to_an_object).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI
from PIL import Image

from tests.support import MODELS, Server, start_server

# Roomy output limits: a constrained JSON answer of random tokens takes tens to a few hundred tokens.
CONFIG = """
[[models]]
id = "qwen-flash"
engine = "local"
path = "{qwen25}"
max_output = 600

[[models]]
id = "qwen3-32b"
engine = "local"
path = "{qwen3}"
max_output = 600

[[models]]
id = "qwen3-vl-plus"
engine = "local"
path = "{qwen3vl}"
max_output = 600
"""

NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 1000},
                "name": {"type": "string", "minLength": 2, "maxLength": 10},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
                    "required": ["city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["id", "name", "address"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["user", "active"],
    "additionalProperties": False,
}
ARRAYS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "maxItems": 2,
        },
    },
    "required": ["tags", "points"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        "kind": {"const": "shirt"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
    },
    "required": ["color", "size", "kind", "note"],
    "additionalProperties": False,
}
NUMBERS = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "temp": {"type": "number", "exclusiveMinimum": -40, "exclusiveMaximum": 50},
        "code": {"type": "string", "minLength": 3, "maxLength": 3},
    },
    "required": ["score", "age", "temp", "code"],
    "additionalProperties": False,
}
SCHEMAS = {"nested": NESTED, "arrays": ARRAYS, "enums": ENUMS, "numbers": NUMBERS}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_current_time", "description": "The time now.", "parameters": {}},
}
MSG = [{"role": "user", "content": "Describe a user."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home: Path = tmp_path_factory.mktemp("structured-home")
    config = home / "config.toml"
    config.write_text(
        CONFIG.format(
            qwen25=MODELS / "tiny-qwen2.5", qwen3=MODELS / "tiny-qwen3", qwen3vl=MODELS / "tiny-qwen3-vl"
        )
    )
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.compat_url, api_key=server.api_key, timeout=120, max_retries=0)


def schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(client: OpenAI, *, stream: bool, model: str = "qwen-flash", **kwargs: Any) -> tuple[str, str | None]:
    """(content, finish_reason) of one answer, streamed or not."""
    kwargs.setdefault("messages", MSG)
    kwargs.setdefault("temperature", 1.0)
    kwargs.setdefault("max_tokens", 500)
    if not stream:
        r = client.chat.completions.create(model=model, **kwargs)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_parses_and_validates(client: OpenAI, name: str, stream: bool) -> None:
    schema = SCHEMAS[name]
    for seed in (1, 2):
        text, finish = ask(client, stream=stream, seed=seed, response_format=schema_format(name, schema))
        assert finish == "stop", (finish, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_on_qwen3_with_thinking_off(client: OpenAI) -> None:
    text, finish = ask(
        client,
        stream=False,
        model="qwen3-32b",
        seed=3,
        response_format=schema_format("enums", ENUMS),
        extra_body={"enable_thinking": False},
    )
    assert finish == "stop"
    jsonschema.validate(json.loads(text), ENUMS)


def test_strict_beside_json_schema_is_accepted(client: OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": NUMBERS}, "strict": True}
    text, finish = ask(client, stream=False, seed=4, response_format=fmt)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), NUMBERS)


def test_batch_of_four_with_different_schemas(client: OpenAI) -> None:
    jobs = [(name, schema, i % 2 == 1) for i, (name, schema) in enumerate(SCHEMAS.items())]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(ask, client, stream=stream, seed=10 + i, response_format=schema_format(name, schema))
            for i, (name, schema, stream) in enumerate(jobs)
        ]
        results = [f.result(timeout=600) for f in futures]
    for (_, schema, _), (text, finish) in zip(jobs, results, strict=True):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_constrained_to_an_object(client: OpenAI) -> None:
    """Any object is allowed, so a random model's keys are unbounded strings: it typically runs to
    max_tokens ("length", an unfinished object); whatever stops must parse as an object."""
    messages = [{"role": "user", "content": "Answer in JSON."}]
    free, _ = ask(client, stream=False, seed=5, messages=messages, max_tokens=12)
    for stream in (False, True):
        text, finish = ask(
            client,
            stream=stream,
            seed=5,
            messages=messages,
            max_tokens=12,
            response_format={"type": "json_object"},
        )
        assert text.startswith("{") and text != free
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert finish == "length"


def ask_tool(
    client: OpenAI, *, stream: bool, model: str = "qwen-flash", **kwargs: Any
) -> tuple[str, Any, str | None]:
    """(content, the one wire tool call as {name, arguments}, finish_reason), streamed or not; the
    streamed call is reassembled from its deltas by ``index``."""
    kwargs.setdefault("messages", MSG)
    kwargs.setdefault("temperature", 1.0)
    kwargs.setdefault("max_tokens", 500)
    if not stream:
        r = client.chat.completions.create(model=model, **kwargs)
        message = r.choices[0].message
        calls = message.tool_calls or []
        assert len(calls) == 1, message
        assert calls[0].id.startswith("call_") and calls[0].type == "function"
        call = {"name": calls[0].function.name, "arguments": json.loads(calls[0].function.arguments)}
        return message.content or "", call, r.choices[0].finish_reason
    text, finish = "", None
    parts: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(model=model, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                part = parts.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function is not None:
                    part["name"] += tc.function.name or ""
                    part["arguments"] += tc.function.arguments or ""
    assert list(parts) == [0], parts
    return text, {"name": parts[0]["name"], "arguments": json.loads(parts[0]["arguments"])}, finish


# qwen3-vl-plus is tiny-qwen3-vl: the same constraint on a VL checkpoint's template.
@pytest.mark.parametrize("model", ["qwen-flash", "qwen3-32b", "qwen3-vl-plus"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_named_tool_choice_yields_a_valid_call(client: OpenAI, model: str, stream: bool) -> None:
    text, call, finish = ask_tool(
        client,
        stream=stream,
        model=model,
        seed=6,
        messages=[{"role": "user", "content": "What's the weather like in Hangzhou?"}],
        tools=[TIME, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_current_weather"}},
        extra_body={"enable_thinking": False},
    )
    assert finish == "tool_calls" and text == "", (finish, text)
    assert call["name"] == "get_current_weather"
    jsonschema.validate(call["arguments"], WEATHER["function"]["parameters"])


def test_named_tool_choice_batch_of_four_with_different_schemas(client: OpenAI) -> None:
    tools = []
    for i, schema in enumerate(SCHEMAS.values()):
        tools.append({"type": "function", "function": {"name": f"tool_{i}", "parameters": schema}})
    with ThreadPoolExecutor(len(tools)) as pool:
        futures = [
            pool.submit(
                ask_tool,
                client,
                stream=i % 2 == 0,
                seed=20 + i,
                tools=tools,
                tool_choice={"type": "function", "function": {"name": tool["function"]["name"]}},
            )
            for i, tool in enumerate(tools)
        ]
        results = [f.result(timeout=600) for f in futures]
    for tool, (_, call, finish) in zip(tools, results, strict=True):
        assert finish == "tool_calls"
        assert call["name"] == tool["function"]["name"]
        jsonschema.validate(call["arguments"], tool["function"]["parameters"])


def test_tool_without_parameters_gets_empty_arguments(client: OpenAI) -> None:
    for stream in (False, True):
        _, call, _ = ask_tool(
            client,
            stream=stream,
            seed=7,
            tools=[TIME],
            tool_choice={"type": "function", "function": {"name": "get_current_time"}},
        )
        assert call == {"name": "get_current_time", "arguments": {}}


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-flash", "messages": MSG, "max_tokens": 5, **body},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"response_format": schema_format("x", {"type": "foo"})}, "response_format", "cannot be compiled"),
        (
            {
                "response_format": schema_format(
                    "x", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}
                )
            },
            "response_format",
            "cannot be compiled",
        ),
        ({"response_format": schema_format("x", {"not": {"type": "string"}})}, "response_format", "'not'"),
        (
            {"response_format": schema_format("x", {"type": "array", "uniqueItems": True})},
            "response_format",
            "'uniqueItems'",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
            },
            "tool_choice",
            "cannot be compiled",
        ),
        (
            {"response_format": {"type": "json_object"}},
            "messages",
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "Unknown format of response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ],
)
def test_refused_constraints(server: Server, body: dict[str, Any], param: str, message: str) -> None:
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["code"] == "invalid_parameter_error"


def test_json_mode_with_thinking_is_refused(server: Server) -> None:
    body = {
        "model": "qwen3-32b",
        "stream": True,
        "enable_thinking": True,
        "messages": [{"role": "user", "content": "json please"}],
        "response_format": {"type": "json_object"},
    }
    r = post(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "Json mode response is not supported when enable_thinking is true"


def test_text_format_is_no_constraint(server: Server) -> None:
    r = post(server, {"response_format": {"type": "text"}, "seed": 1, "temperature": 1.0})
    plain = post(server, {"seed": 1, "temperature": 1.0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_named_tool_choice_on_a_vl_model_with_an_image_and_a_tool_turn(client: OpenAI) -> None:
    """Qwen-VL with tools: an image in the user turn, then the call's result fed back as a tool turn."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    user = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "What's the weather where this photo was taken?"},
        ],
    }
    choice = {"type": "function", "function": {"name": "get_current_weather"}}
    for stream in (False, True):
        text, call, finish = ask_tool(
            client,
            stream=stream,
            model="qwen3-vl-plus",
            seed=7,
            messages=[user],
            tools=[TIME, WEATHER],
            tool_choice=choice,
        )
        assert finish == "tool_calls" and text == "", (finish, text)
        jsonschema.validate(call["arguments"], WEATHER["function"]["parameters"])
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    followup = client.chat.completions.create(
        model="qwen3-vl-plus",
        messages=[
            user,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_current_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "Sunny, 24°C."},
        ],
        tools=[TIME, WEATHER],
        tool_choice=choice,
        temperature=1.0,
        seed=8,
        max_tokens=500,
    )
    calls = followup.choices[0].message.tool_calls or []
    assert followup.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    # The image of the first turn is still in the prompt, billed as image tokens.
    assert followup.usage is not None and followup.usage.prompt_tokens_details is not None
    assert followup.usage.prompt_tokens_details.model_dump().get("image_tokens", 0) > 0
