"""The llama.cpp engine through the real server and real clients, on the tiny Qwen GGUFs (conversions
of tiny-qwen2.5 / tiny-qwen3): the seed examples, streaming, usage equal to the transformers engine's,
stops and seeds, cancellation, /health, concurrent streams, and tool / JSON-schema requests answered
or refused by capability."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support import MODELS, Server, assert_schema, start_server, wait_for

pytest.importorskip("llama_cpp")

GGUF = MODELS / "tiny-gguf"
# No `engine`: a .gguf path goes to llama.cpp by itself (the test of that is /health's engine name).
CONFIG = f"""
[[models]]
id = "qwen-plus"
path = "{GGUF / "tiny-qwen2.5-f16.gguf"}"
max_output = 48

[[models]]
id = "qwen-turbo"
path = "{GGUF / "tiny-qwen2.5-f16.gguf"}"
max_output = 4096
max_batch_size = 4

[[models]]
id = "qwen3-8b"
path = "{GGUF / "tiny-qwen3-f16.gguf"}"
max_output = 48
max_reasoning = 64
"""
SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你是谁?"},
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
]
VARIED: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def gguf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("gguf-home")
    config = home / "config.toml"
    config.write_text(CONFIG)
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The transformers engine on the checkpoint the tiny GGUF was converted from (one model: the
    comparison needs no more)."""
    home = tmp_path_factory.mktemp("hf-home")
    config = home / "config.toml"
    config.write_text(f'[[models]]\nid = "qwen-plus"\nengine = "local"\npath = "{MODELS / "tiny-qwen2.5"}"\n')
    srv = start_server(home, "--config", str(config), timeout=600)
    yield srv
    srv.stop()


def client(server: Server) -> OpenAI:
    return OpenAI(api_key=server.api_key, base_url=server.compat_url, max_retries=0)


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-plus", "messages": SEED_MESSAGES, **body},
        timeout=120,
    )


def health_of(server: Server, model: str) -> dict[str, Any]:
    body = httpx.get(f"{server.base_url}/health", timeout=10).json()
    return next(m for m in body["models"] if m["id"] == model)  # type: ignore[no-any-return]


def test_gguf_models_run_on_llamacpp(gguf_server: Server) -> None:
    for model in ("qwen-plus", "qwen-turbo", "qwen3-8b"):
        status = health_of(gguf_server, model)
        assert (status["engine"], status["state"], status["active_generations"]) == ("llamacpp", "ready", 0)


def test_seed_non_stream(gguf_server: Server) -> None:
    completion = client(gguf_server).chat.completions.create(model="qwen-plus", messages=SEED_MESSAGES)  # type: ignore[arg-type]
    body = json.loads(completion.model_dump_json())
    assert body["object"] == "chat.completion" and body["model"] == "qwen-plus"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    # DashScope's qwen-plus counted this prompt as 22 tokens (seeds/002); so does the GGUF's vocabulary.
    assert body["usage"]["prompt_tokens"] == 22
    assert 1 <= body["usage"]["completion_tokens"] <= 48
    r = post(gguf_server, {"seed": 1, **VARIED})
    assert r.status_code == 200, r.text
    assert_schema(r.json(), "CreateChatCompletionResponse")
    (row,) = gguf_server.ledger(r.headers["x-request-id"])
    usage = r.json()["usage"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


def test_seed_stream_with_usage(gguf_server: Server) -> None:
    stream = client(gguf_server).chat.completions.create(
        model="qwen-plus",
        messages=SEED_MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        seed=3,
        max_tokens=12,
        **VARIED,
    )
    chunks = [json.loads(c.model_dump_json(exclude_unset=True)) for c in stream]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == 22 and 1 <= usage["completion_tokens"] <= 12
    # The same seed without streaming writes the same answer.
    again = post(gguf_server, {"seed": 3, "max_tokens": 12, **VARIED}).json()
    assert again["choices"][0]["message"]["content"] == text
    assert again["usage"] == usage


@pytest.mark.parametrize(
    "body",
    [
        {"messages": SEED_MESSAGES},
        {"messages": [{"role": "user", "content": "你好,请介绍一下你自己 🌟 and some English."}]},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_current_weather", "arguments": '{"location": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 °C"},
            ],
            "tools": TOOLS,
        },
    ],
    ids=["seed", "chinese", "tools", "tool-turn"],
)
def test_usage_equals_the_transformers_engine(
    gguf_server: Server, hf_server: Server, body: dict[str, Any]
) -> None:
    """Same checkpoint, two engines: the prompt is rendered and counted alike, and an answer cut by
    max_tokens counts max_tokens on both."""
    ours = post(gguf_server, {**body, "max_tokens": 5, "seed": 7, **VARIED})
    theirs = post(hf_server, {**body, "max_tokens": 5, "seed": 7, **VARIED})
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    a, b = ours.json(), theirs.json()
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    for answer in (a, b):
        if answer["choices"][0]["finish_reason"] == "length":
            assert answer["usage"]["completion_tokens"] == 5


def test_stop_string_and_max_tokens(gguf_server: Server) -> None:
    full = post(gguf_server, {"seed": 5, "max_tokens": 30, **VARIED}).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = post(gguf_server, {"seed": 5, "max_tokens": 30, "stop": [stop], **VARIED}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    capped = post(gguf_server, {"seed": 5, "max_tokens": 4, **VARIED}).json()
    if capped["choices"][0]["finish_reason"] == "length":
        assert capped["usage"]["completion_tokens"] == 4


def test_penalties_take_effect(gguf_server: Server) -> None:
    """Greedy decoding of random weights repeats itself; a repetition penalty changes the answer, and
    so does a presence penalty."""
    plain = post(gguf_server, {"temperature": 0, "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    rep = post(gguf_server, {"temperature": 0, "max_tokens": 24, "repetition_penalty": 1.8}).json()
    pres = post(gguf_server, {"temperature": 0, "max_tokens": 24, "presence_penalty": 2.0}).json()
    assert rep["choices"][0]["message"]["content"] != plain
    assert pres["choices"][0]["message"]["content"] != plain


def test_cancelled_stream_frees_its_slot(gguf_server: Server) -> None:
    # top_k off: over the whole vocabulary an end-of-turn id is (practically) never drawn, so the
    # answer is still running when the client goes away.
    body = {
        "model": "qwen-turbo",
        "messages": SEED_MESSAGES,
        "stream": True,
        "max_tokens": 4000,
        "seed": 9,
        "top_k": 0,
        **VARIED,
    }
    headers = {"Authorization": f"Bearer {gguf_server.api_key}"}
    with (
        httpx.Client(timeout=60, headers=headers) as http,
        http.stream("POST", f"{gguf_server.compat_url}/chat/completions", json=body) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                seen += 1
                if seen == 3:
                    break
    wait_for(
        lambda: health_of(gguf_server, "qwen-turbo")["active_generations"] == 0, "the slot to be freed", 30
    )
    # The ledger has the request with what it generated until the client left (this tiny model writes
    # thousands of tokens a second, so on a slow client the whole answer may already have been made:
    # tests/unit/engines/test_llamacpp_engine.py shows the slot freed mid-answer without that race).
    request_id = r.headers["x-request-id"]
    wait_for(lambda: bool(gguf_server.ledger(request_id)), "the ledger row", 30)
    row = gguf_server.ledger(request_id)[0]
    assert row["status"] in ("cancelled", "ok") and row["prompt_tokens"] == 22
    assert row["completion_tokens"] >= 1
    if row["status"] == "cancelled":
        # Charged exactly what the engine generated, delivered or not (its own final count).
        line = (
            f"request {request_id} stopped early: 22 prompt and {row['completion_tokens']} generated tokens"
        )
        assert line in gguf_server.log()


def test_concurrent_streams_decode_together(gguf_server: Server) -> None:
    """Three streams open at once all progress while the others are unfinished (order of events, not
    timing) and the engine counts them active together; inside the engine they share llama_decode
    calls (tests/unit/engines/test_llamacpp_engine.py shows that with the scheduler's widest step)."""
    body = {
        "model": "qwen-turbo",
        "messages": SEED_MESSAGES,
        "stream": True,
        "max_tokens": 4000,
        "top_k": 0,
        **VARIED,
    }
    headers = {"Authorization": f"Bearer {gguf_server.api_key}"}
    url = f"{gguf_server.compat_url}/chat/completions"

    def contents(lines: Iterator[str], count: int) -> int:
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == count:
                    break
        return seen

    with (
        httpx.Client(timeout=60, headers=headers) as http,
        http.stream("POST", url, json={**body, "seed": 1}) as a,
        http.stream("POST", url, json={**body, "seed": 2}) as b,
        http.stream("POST", url, json={**body, "seed": 3}) as c,
    ):
        lines = [a.iter_lines(), b.iter_lines(), c.iter_lines()]
        for _ in range(2):
            for it in lines:
                assert contents(it, 3) == 3
        assert health_of(gguf_server, "qwen-turbo")["active_generations"] == 3
    wait_for(
        lambda: health_of(gguf_server, "qwen-turbo")["active_generations"] == 0, "the engine to be idle", 30
    )


def test_tool_request_is_answered(gguf_server: Server) -> None:
    """Tools are offered through the GGUF's template (auto choice): a valid completion comes back."""
    for stream in (False, True):
        r = post(gguf_server, {"tools": TOOLS, "seed": 2, "max_tokens": 16, "stream": stream, **VARIED})
        assert r.status_code == 200, r.text
        if not stream:
            assert_schema(r.json(), "CreateChatCompletionResponse")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_current_weather"}},
            },
            "tool_choice",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            "response_format",
        ),
        ({"logprobs": True}, "logprobs"),
    ],
    ids=["named-tool", "json-schema", "logprobs"],
)
def test_constraints_refused_by_capability(gguf_server: Server, body: dict[str, Any], param: str) -> None:
    r = post(gguf_server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_parameter_error", error


def test_thinking_with_budget_streams_reasoning(gguf_server: Server) -> None:
    stream = client(gguf_server).chat.completions.create(
        model="qwen3-8b",
        messages=[{"role": "user", "content": "Think first."}],
        stream=True,
        stream_options={"include_usage": True},
        seed=4,
        max_tokens=8,
        extra_body={"enable_thinking": True, "thinking_budget": 6},
        **VARIED,
    )
    chunks = [json.loads(c.model_dump_json(exclude_unset=True)) for c in stream]
    reasoning = "".join(
        c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"]
    )
    usage = chunks[-1]["usage"]
    assert reasoning and "</think>" not in reasoning
    assert usage["completion_tokens_details"]["reasoning_tokens"] <= 6
