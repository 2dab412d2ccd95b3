"""Parameters through the real server: DashScope's ranges and messages, and their effect on output."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support import Server, assert_schema

MSG = [{"role": "user", "content": "Tell me a story about the sea."}]


def post(server: Server, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}", **kw.pop("headers", {})},
        timeout=60,
        **({"content": body} if isinstance(body, (bytes, str)) else {"json": body}),
        **kw,
    )


def err(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["request_id"] == r.headers["x-request-id"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"temperature": 2.0}, "temperature", "Temperature should be in [0.0, 2.0)"),
        ({"temperature": -0.1}, "temperature", "Temperature should be in [0.0, 2.0)"),
        ({"top_p": 0}, "top_p", "Range of top_p should be (0.0, 1.0]"),
        ({"top_p": 1.01}, "top_p", "Range of top_p should be (0.0, 1.0]"),
        ({"top_k": -1}, "top_k", "Parameter top_k be greater than or equal to 0"),
        ({"presence_penalty": 2.5}, "presence_penalty", "Presence_penalty should be in [-2.0, 2.0]"),
        ({"repetition_penalty": 0}, "repetition_penalty", "Repetition_penalty should be greater than 0.0"),
        ({"n": 5}, "n", "Range of n should be [1, 4]"),
        ({"n": 0}, "n", "Range of n should be [1, 4]"),
        ({"max_tokens": 0}, "max_tokens", "Range of max_tokens should be [1, 48]"),
        ({"max_tokens": 49}, "max_tokens", "Range of max_tokens should be [1, 48]"),
        ({"max_completion_tokens": 100}, "max_completion_tokens", "Range of max_tokens should be [1, 48]"),
        ({"seed": -1}, "seed", "Range of seed should be [0, 9223372036854775807]"),
        (
            {"stop": ["a", 1]},
            "stop",
            'The "stop" parameter must be of type "str", "list[str]", "list[int]", or "list[list[int]]"',
        ),
        (
            {"tool_choice": "required"},
            "tool_choice",
            'tool_choice is one of the strings that should be ["none", "auto"]',
        ),
    ],
)
def test_out_of_range(server: Server, extra: dict[str, Any], param: str, message: str) -> None:
    e = err(post(server, {"model": "qwen-plus", "messages": MSG, **extra}))
    assert e == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": "invalid_parameter_error",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "qwen-plus", "messages": []}, "messages"),
        ({"model": "qwen-plus", "messages": "hi"}, "messages"),
        ({"model": "qwen-plus", "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": "qwen-plus", "messages": [{"role": "user", "content": 123}]}, "messages.0.content"),
        (
            {"model": "qwen-plus", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages.0.content.0.type",
        ),
        (
            {"model": "qwen-plus", "messages": MSG, "stream_options": {"include_usage": "often"}},
            "stream_options.include_usage",
        ),
        ({"model": "qwen-plus", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "qwen-plus", "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": "qwen-plus", "messages": MSG, "stream": "maybe"}, "stream"),
        ({"model": "qwen-plus", "messages": MSG, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": MSG}, "model"),
        ({"model": "qwen-plus"}, "messages"),
    ],
)
def test_bad_shapes_are_400_naming_param(server: Server, body: dict[str, Any], param: str) -> None:
    e = err(post(server, body))
    assert e["param"] == param and e["code"] == "invalid_parameter_error"


def test_empty_messages_message(server: Server) -> None:
    assert err(post(server, {"model": "qwen-plus", "messages": []}))["message"] == "[] is too short"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", '"text"'])
def test_malformed_json_is_400(server: Server, raw: bytes | str) -> None:
    e = err(post(server, raw, headers={"Content-Type": "application/json"}))
    assert e["message"] == "The input parameter requires json format."


@pytest.mark.parametrize("model", ["qwen-unknown", "Qwen-Plus"])
def test_unknown_model_404(server: Server, model: str) -> None:
    e = err(post(server, {"model": model, "messages": MSG}), 404)
    assert e["code"] == "model_not_found"
    assert e["message"] == f"The model `{model}` does not exist or you do not have access to it."


def test_wrong_method_and_route(server: Server) -> None:
    r = httpx.get(
        f"{server.compat_url}/chat/completions", headers={"Authorization": f"Bearer {server.api_key}"}
    )
    assert r.status_code == 405
    assert r.json()["error"]["message"] == "Request method 'GET' is not supported."
    r = httpx.get(f"{server.compat_url}/nothing-here", headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code in (401, 404)


def test_extra_fields_and_headers_tolerated(server: Server) -> None:
    r = post(
        server,
        {
            "model": "qwen-plus",
            "messages": [
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}
                    ],
                },
                {"role": "user", "content": "hi"},
            ],
            "metadata": {"sessionId": "s1", "promptId": "p1", "channel": "cli"},
            "vl_high_resolution_images": True,
            "parallel_tool_calls": False,
            "user": "u-1",
            "max_tokens": 4,
        },
        headers={
            "X-DashScope-CacheControl": "enable",
            "X-DashScope-UserAgent": "qwen-code/1.0",
            "X-DashScope-AuthType": "openai",
            "X-DashScope-DataInspection": '{"input":"cip"}',
        },
    )
    assert r.status_code == 200, r.text
    assert_schema(r.json(), "CreateChatCompletionResponse")


def sdk(server: Server) -> OpenAI:
    return OpenAI(api_key=server.api_key, base_url=server.compat_url)


def answer_text(server: Server, **kw: Any) -> str:
    r = sdk(server).chat.completions.create(model="qwen-plus", messages=MSG, **kw)  # type: ignore[arg-type]
    return r.choices[0].message.content or ""


def test_max_tokens_gives_length(server: Server) -> None:
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = sdk(server).chat.completions.create(
            model="qwen-plus",
            messages=MSG,
            temperature=0.9,
            seed=7,
            **kw,  # type: ignore[arg-type]
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 5


def test_seed_is_deterministic(server: Server) -> None:
    def run(seed: int) -> str:
        r = sdk(server).chat.completions.create(
            model="qwen-plus",
            messages=MSG,
            temperature=1.2,
            top_p=1.0,
            seed=seed,
            max_tokens=20,  # type: ignore[arg-type]
        )
        return r.choices[0].message.content or ""

    a, b, c = run(42), run(42), run(43)
    assert a == b
    assert a != c


def test_greedy_is_deterministic(server: Server) -> None:
    outs = {
        sdk(server)
        .chat.completions.create(
            model="qwen-plus",
            messages=MSG,
            temperature=0,
            max_tokens=12,  # type: ignore[arg-type]
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(outs) == 1


def test_stop_string_is_not_returned(server: Server) -> None:
    base = answer_text(server, temperature=1.0, seed=3, max_tokens=30)
    assert len(base) > 4
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    cut = sdk(server).chat.completions.create(
        model="qwen-plus",
        messages=MSG,
        temperature=1.0,
        seed=3,
        max_tokens=30,
        stop=[stop],  # type: ignore[arg-type]
    )
    text = cut.choices[0].message.content or ""
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in text and base.startswith(text)


def test_stop_token_ids(server: Server) -> None:
    from transformers import AutoTokenizer

    from tests.support import MODELS

    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")
    base = answer_text(server, temperature=1.0, seed=5, max_tokens=20)
    ids = tok(base, add_special_tokens=False)["input_ids"]
    target = ids[5]
    r = post(
        server,
        {
            "model": "qwen-plus",
            "messages": MSG,
            "temperature": 1.0,
            "seed": 5,
            "max_tokens": 20,
            "stop": [[target]],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] <= 6


def test_n_choices(server: Server) -> None:
    r = sdk(server).chat.completions.create(
        model="qwen-plus",
        messages=MSG,
        n=3,
        temperature=1.0,
        seed=11,
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage is not None and r.usage.completion_tokens == 24
    stream = sdk(server).chat.completions.create(
        model="qwen-plus",
        messages=MSG,
        n=2,
        temperature=1.0,
        seed=11,
        max_tokens=8,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_penalties_and_top_k_accepted(server: Server) -> None:
    r = sdk(server).chat.completions.create(
        model="qwen-plus",
        messages=MSG,
        max_tokens=6,
        presence_penalty=1.5,
        frequency_penalty=0.5,  # type: ignore[arg-type]
        extra_body={"repetition_penalty": 1.3, "top_k": 5, "enable_search": False},
    )
    assert r.usage is not None and r.usage.completion_tokens >= 1


def test_stream_only_and_thinking_rules(server: Server) -> None:
    # qwen3-8b is a Qwen3 open-source id: thinking on by default, so non-stream needs it off.
    e = err(post(server, {"model": "qwen3-8b", "messages": MSG}))
    assert e["message"] == "parameter.enable_thinking must be set to false for non-streaming calls"
    r = post(server, {"model": "qwen3-8b", "messages": MSG, "enable_thinking": False, "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_prompt_longer_than_context(server: Server) -> None:
    long = [{"role": "user", "content": "word " * 200}]
    for stream in (False, True):
        e = err(post(server, {"model": "qwen-max", "messages": long, "stream": stream}))
        assert e["message"] == "Range of input length should be [1, 63]"
        assert e["param"] == "messages" and e["code"] == "invalid_parameter_error"


def test_answer_is_cut_at_the_context_window(server: Server) -> None:
    # 30 prompt tokens + max_tokens 48 > 64: generation stops at the window with "length".
    msgs = [{"role": "user", "content": "hi"}]
    r = sdk(server).chat.completions.create(
        model="qwen-max", messages=msgs, max_tokens=48, temperature=1.0, seed=1
    )  # type: ignore[arg-type]
    assert r.usage is not None
    assert r.usage.total_tokens == 64 and r.choices[0].finish_reason == "length"


WEATHER_TOOL = {
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
}


def test_usage_counts_the_rendered_tools(server: Server) -> None:
    from transformers import AutoTokenizer

    from tests.support import MODELS

    msgs = [{"role": "user", "content": "杭州天气怎么样"}]
    r = post(server, {"model": "qwen-plus", "messages": msgs, "tools": [WEATHER_TOOL], "max_tokens": 3})
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")
    text = tok.apply_chat_template(msgs, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    assert r.json()["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
    without = post(server, {"model": "qwen-plus", "messages": msgs, "max_tokens": 3}).json()["usage"]
    assert r.json()["usage"]["prompt_tokens"] > without["prompt_tokens"] + 50


def test_partial_mode_continues_the_prefix(server: Server) -> None:
    from transformers import AutoTokenizer

    from tests.support import MODELS

    msgs = [{"role": "user", "content": "请对“春天来了,大地”这句话进行续写"}]
    prefix = "春天来了,大地"
    r = post(
        server,
        {
            "model": "qwen-plus",
            "max_tokens": 4,
            "messages": [*msgs, {"role": "assistant", "content": prefix, "partial": True}],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert not body["choices"][0]["message"]["content"].startswith(prefix)
    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + prefix
    # The prefix is billed as input, exactly as rendered.
    assert body["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])


def test_model_config_sampling_defaults(server: Server) -> None:
    msgs = [{"role": "user", "content": "hi"}]

    def text(model: str) -> str:
        r = sdk(server).chat.completions.create(model=model, messages=msgs, max_tokens=10)  # type: ignore[arg-type]
        return r.choices[0].message.content or ""

    # qwen-max's config sets temperature = 0: unseeded requests repeat exactly.
    assert len({text("qwen-max") for _ in range(3)}) == 1
    # qwen-plus keeps the checkpoint's own sampling (temperature 0.7): unseeded requests vary.
    assert len({text("qwen-plus") for _ in range(3)}) > 1


def test_nothing_to_answer_is_400_not_500(server: Server) -> None:
    only_prefix = [{"role": "assistant", "content": "a", "partial": True}]
    for stream in (False, True):
        e = err(
            post(server, {"model": "qwen-plus", "messages": only_prefix, "max_tokens": 3, "stream": stream})
        )
        assert e["param"] == "messages" and e["code"] == "invalid_parameter_error"


def test_deep_tool_call_arguments_do_not_break_rendering(server: Server) -> None:
    deep_args = "[" * 5_000 + "]" * 5_000  # deeper than json.loads can recurse
    msgs = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": deep_args}}
            ],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "call_1"},
    ]
    r = post(server, {"model": "qwen-plus", "messages": msgs, "max_tokens": 2})
    # Unparseable-as-a-value arguments are rendered as the text they are; the request is answered.
    assert r.status_code == 200, r.text
