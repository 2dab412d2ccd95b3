"""The native DashScope protocol through the real server: the official ``dashscope`` SDK (sync and
async, streaming and not), raw httpx checks of the SSE framing and error bodies against the captures,
and one conversation through both protocols."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Iterator
from typing import Any

import dashscope
import httpx
import pytest
from dashscope import AioGeneration, AioMultiModalConversation, Generation, MultiModalConversation
from dashscope.api_entities.aio_session import close_shared_aio_session

from tests.media_support import png_bytes
from tests.support import MODELS, SHARED, Server, create_key, start_server

CAPTURES = SHARED / "reference" / "captures"

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{qwen25}"
max_output = 48

[[models]]
id = "qwen3-8b"
path = "{qwen3}"
max_output = 16
max_reasoning = 8

[[models]]
id = "qwen-mt-plus"
path = "{qwen25}"
max_output = 16

[[models]]
id = "qwen-vl-max"
path = "{qwen25vl}"
max_output = 8
"""

TEXT_URL = "/api/v1/services/aigc/text-generation/generation"
MM_URL = "/api/v1/services/aigc/multimodal-generation/generation"
MSG = [{"role": "user", "content": "What is 1+1?"}]
SAMPLING = {"seed": 1234, "temperature": 0.85, "top_p": 0.8, "max_tokens": 6}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("native-home")
    config = home / "config.toml"
    config.write_text(
        CONFIG.format(
            qwen25=MODELS / "tiny-qwen2.5", qwen3=MODELS / "tiny-qwen3", qwen25vl=MODELS / "tiny-qwen2.5-vl"
        )
    )
    srv = start_server(home, "--config", str(config), timeout=600)
    yield srv
    srv.stop()


@pytest.fixture
def sdk(server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """The SDK pointed at our server (its documented module setting), with our key."""
    monkeypatch.setattr(dashscope, "base_http_api_url", f"{server.base_url}/api/v1")
    return server.api_key


def post(
    server: Server, url: str, body: dict[str, Any], *, sse: bool = False, key: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or server.api_key}"}
    if sse:
        headers["X-DashScope-SSE"] = "enable"
    return httpx.post(server.base_url + url, headers=headers, json=body, timeout=300)


def events_of(text: str) -> list[list[str]]:
    """An SSE body -> its events, each the list of its lines (blank separators dropped; the
    capture's BOM too)."""
    events: list[list[str]] = []
    for line in text.lstrip("\ufeff").splitlines():
        if not line:
            continue
        if line.startswith("id:"):
            events.append([])
        events[-1].append(line)
    return events


def data_of(event: list[str]) -> dict[str, Any]:
    return json.loads(event[-1][len("data:") :])  # type: ignore[no-any-return]


def data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()


# -- the SDK -----------------------------------------------------------------------------------------


def test_sdk_generation_message_and_text(server: Server, sdk: str) -> None:
    r = Generation.call(model="qwen-plus", messages=MSG, result_format="message", api_key=sdk, **SAMPLING)
    assert r.status_code == 200, r
    choice = r.output.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    [row] = server.ledger(r.request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (r.usage.input_tokens, r.usage.output_tokens)

    # qwen-plus answers in text form unless asked (reference §1.5); a prompt is one user message.
    t = Generation.call(model="qwen-plus", prompt="What is 1+1?", api_key=sdk, **SAMPLING)
    assert t.status_code == 200, t
    assert t.output.text == choice.message.content  # same seed, same prompt
    assert t.output.choices is None
    assert t.usage.input_tokens == r.usage.input_tokens


def test_sdk_generation_stream_matches_whole_answer(server: Server, sdk: str) -> None:
    whole = Generation.call(model="qwen-plus", messages=MSG, result_format="message", api_key=sdk, **SAMPLING)
    parts = list(
        Generation.call(
            model="qwen-plus",
            messages=MSG,
            result_format="message",
            stream=True,
            incremental_output=True,
            api_key=sdk,
            **SAMPLING,
        )
    )
    assert all(p.status_code == 200 for p in parts)
    text = "".join(p.output.choices[0].message.content for p in parts)
    assert text == whole.output.choices[0].message.content
    assert [p.output.choices[0].finish_reason for p in parts][-1] in ("stop", "length")
    assert all(p.output.choices[0].finish_reason == "null" for p in parts[:-1])
    assert parts[-1].usage.output_tokens == whole.usage.output_tokens
    # The SDK's own non-incremental mode (it asks for increments and merges them itself).
    merged = list(
        Generation.call(
            model="qwen-plus", messages=MSG, result_format="message", stream=True, api_key=sdk, **SAMPLING
        )
    )
    assert merged[-1].output.choices[0].message.content == text


def test_sdk_async_generation(server: Server, sdk: str) -> None:
    async def run() -> tuple[Any, list[Any]]:
        whole = await AioGeneration.call(model="qwen-plus", prompt="Hello", api_key=sdk, **SAMPLING)
        stream = await AioGeneration.call(
            model="qwen-plus", prompt="Hello", stream=True, incremental_output=True, api_key=sdk, **SAMPLING
        )
        parts = [p async for p in stream]
        await close_shared_aio_session()  # the SDK's shared session belongs to this event loop
        return whole, parts

    whole, parts = asyncio.run(run())
    assert whole.status_code == 200, whole
    assert "".join(p.output.text for p in parts) == whole.output.text
    assert parts[-1].output.finish_reason in ("stop", "length")


def test_sdk_multimodal_conversation(server: Server, sdk: str) -> None:
    messages = [
        {"role": "system", "content": [{"text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"image": data_uri()}, {"text": "What is this?"}]},
    ]
    r = MultiModalConversation.call(model="qwen-vl-max", messages=messages, api_key=sdk, seed=7, max_tokens=4)
    assert r.status_code == 200, r
    content = r.output.choices[0].message.content
    assert isinstance(content, list) and set(content[0]) == {"text"}
    assert r.usage.image_tokens > 0
    assert r.usage.input_tokens_details["image_tokens"] == r.usage.image_tokens
    parts = list(
        MultiModalConversation.call(
            model="qwen-vl-max",
            messages=messages,
            api_key=sdk,
            seed=7,
            max_tokens=4,
            stream=True,
            incremental_output=True,
        )
    )
    assert (
        "".join(c["text"] for p in parts for c in p.output.choices[0].message.content) == content[0]["text"]
    )
    assert all(p.usage.image_tokens == r.usage.image_tokens for p in parts)

    async def run() -> tuple[Any, list[Any]]:
        whole = await AioMultiModalConversation.call(
            model="qwen-vl-max", messages=messages, api_key=sdk, seed=7, max_tokens=4
        )
        stream = await AioMultiModalConversation.call(
            model="qwen-vl-max",
            messages=messages,
            api_key=sdk,
            seed=7,
            max_tokens=4,
            stream=True,
            incremental_output=True,
        )
        parts = [p async for p in stream]
        await close_shared_aio_session()  # the SDK's shared session belongs to this event loop
        return whole, parts

    whole, aparts = asyncio.run(run())
    assert whole.output.choices[0].message.content == content
    assert (
        "".join(c["text"] for p in aparts for c in p.output.choices[0].message.content) == content[0]["text"]
    )


def test_sdk_reports_native_errors(server: Server, sdk: str) -> None:
    r = Generation.call(model="qwen-plus", messages=MSG, api_key="sk-not-a-key")
    assert (r.status_code, r.code, r.message) == (401, "InvalidApiKey", "Invalid API-key provided.")
    r = Generation.call(model="qwen-plus", messages=MSG, temperature=5.0, api_key=sdk)
    assert (r.status_code, r.code) == (400, "InvalidParameter")
    assert r.message == "Temperature should be in [0.0, 2.0)"
    [s] = list(Generation.call(model="qwen-plus", messages=MSG, temperature=5.0, stream=True, api_key=sdk))
    assert (s.status_code, s.code) == (400, "InvalidParameter")
    r = Generation.call(model="Qwen-Plus", messages=MSG, api_key=sdk)
    assert (r.status_code, r.code, r.message) == (404, "ModelNotFound", "Model not exist.")


# -- raw framing against the captures ----------------------------------------------------------------


def test_sse_framing_matches_the_capture(server: Server) -> None:
    capture = events_of((CAPTURES / "single-generation-message-sse.response.body.txt").read_text())
    body = {
        "model": "qwen-plus",
        "input": {"messages": MSG},
        "parameters": {"result_format": "message", "incremental_output": True, **SAMPLING},
    }
    r = post(server, TEXT_URL, body, sse=True)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream;charset=UTF-8"
    ours = events_of(r.text)
    assert len(ours) >= 2
    for theirs_or_ours in (capture, ours):
        for n, event in enumerate(theirs_or_ours, start=1):
            assert [line.split(":", 1)[0] for line in event] == ["id", "event", "", "data"]
            assert event[:3] == [f"id:{n}", "event:result", ":HTTP_STATUS/200"]
    last_capture, last_ours = data_of(capture[-1]), data_of(ours[-1])
    for theirs, mine in zip((data_of(e) for e in capture), (data_of(e) for e in ours), strict=False):
        assert set(mine) == set(theirs) == {"output", "usage", "request_id"}
        assert set(mine["output"]["choices"][0]) == set(theirs["output"]["choices"][0])
        assert set(mine["output"]["choices"][0]["message"]) == set(theirs["output"]["choices"][0]["message"])
        assert set(mine["usage"]) == set(theirs["usage"])
    datas = [data_of(e) for e in ours]
    assert [d["output"]["choices"][0]["finish_reason"] for d in datas[:-1]] == ["null"] * (len(datas) - 1)
    assert last_ours["output"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert last_capture["output"]["choices"][0]["finish_reason"] == "stop"
    outputs = [d["usage"]["output_tokens"] for d in datas]
    assert outputs == sorted(outputs) and outputs[0] >= 1  # cumulative, from the first token
    assert all(d["usage"]["input_tokens"] == datas[0]["usage"]["input_tokens"] for d in datas)
    assert {d["request_id"] for d in datas} == {r.headers["x-request-id"]}


def test_incremental_output_false_repeats_the_text_so_far(server: Server) -> None:
    params = {"result_format": "text", **SAMPLING}
    whole = post(server, TEXT_URL, {"model": "qwen-plus", "input": {"prompt": "Hi"}, "parameters": params})
    assert whole.status_code == 200, whole.text
    assert set(whole.json()["output"]) == {"finish_reason", "text"}
    r = post(
        server,
        TEXT_URL,
        {
            "model": "qwen-plus",
            "input": {"prompt": "Hi"},
            "parameters": {**params, "incremental_output": False},
        },
        sse=True,
    )
    texts = [data_of(e)["output"]["text"] for e in events_of(r.text)]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert texts[-1] == whole.json()["output"]["text"]
    assert len(set(texts)) > 1


def test_error_bodies_match_the_captures(server: Server) -> None:
    auth = json.loads((CAPTURES / "auth-error-nosse.response.body.txt").read_text().lstrip("\ufeff"))
    r = post(server, TEXT_URL, {"model": "qwen-plus", "input": {"messages": MSG}}, key="sk-wrong")
    assert r.status_code == 401
    assert set(r.json()) == set(auth)
    assert (r.json()["code"], r.json()["message"]) == (auth["code"], auth["message"])
    assert r.json()["request_id"] == r.headers["x-request-id"]

    request = json.loads((CAPTURES / "parameter-error-nosse.request.body.json").read_text().lstrip("\ufeff"))
    request["model"] = "qwen-plus"
    expected = json.loads((CAPTURES / "parameter-error-nosse.response.body.txt").read_text().lstrip("\ufeff"))
    r = post(server, TEXT_URL, request)
    assert r.status_code == 400
    assert set(r.json()) == set(expected)
    assert (r.json()["code"], r.json()["message"]) == (expected["code"], expected["message"])

    [captured] = events_of((CAPTURES / "parameter-error-sse.response.body.txt").read_text())
    r = post(server, TEXT_URL, request, sse=True)
    assert r.status_code == 400  # the capture says 200; the error's own status keeps the SDK's code right
    assert r.headers["content-type"] == "text/event-stream;charset=UTF-8"
    [ours] = events_of(r.text)
    assert ours[:3] == captured[:3] == ["id:1", "event:error", ":HTTP_STATUS/400"]
    assert set(data_of(ours)) == set(data_of(captured))
    assert data_of(ours)["message"] == data_of(captured)["message"]

    for body, code in (
        ({"input": {"messages": MSG}}, "BadRequest.EmptyModel"),
        ({"model": "qwen-plus"}, "BadRequest.EmptyInput"),
        ({"model": "qwen-plus", "input": {}}, "BadRequest.EmptyInput"),
    ):
        r = post(server, TEXT_URL, body)
        assert (r.status_code, r.json()["code"]) == (400, code), r.text


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"top_p": 0.0}, "Range of top_p should be (0.0, 1.0]"),
        ({"temperature": "hot"}, "parameters.temperature"),
        ({"stop": [1, "x"]}, 'The "stop" parameter must be of type'),
        ({"result_format": "xml"}, 'result_format must be "text" or "message"'),
        ({"tools": [{"type": "function", "function": {"name": "search"}}]}, "Tool names are not allowed"),
        ({"logit_bias": {"1": 2}}, "logit_bias is not supported"),
    ],
)
def test_native_parameters_are_validated_as_in_compatible_mode(
    server: Server, parameters: dict[str, Any], message: str
) -> None:
    r = post(server, TEXT_URL, {"model": "qwen-plus", "input": {"messages": MSG}, "parameters": parameters})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "InvalidParameter"
    assert message in r.json()["message"]


# -- one conversation, both protocols ----------------------------------------------------------------


def test_same_conversation_same_tokens_and_text_in_both_protocols(server: Server) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]
    compat = httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-plus", "messages": messages, **SAMPLING},
        timeout=300,
    ).json()
    native = post(
        server,
        TEXT_URL,
        {
            "model": "qwen-plus",
            "input": {"messages": messages},
            "parameters": {"result_format": "message", **SAMPLING},
        },
    ).json()
    assert native["usage"]["input_tokens"] == compat["usage"]["prompt_tokens"]
    assert native["usage"]["output_tokens"] == compat["usage"]["completion_tokens"]
    assert native["output"]["choices"][0]["message"]["content"] == compat["choices"][0]["message"]["content"]


def test_sdk_history_is_the_turns_before_the_prompt(server: Server, sdk: str) -> None:
    """``Generation.call(history=...)`` (``input.history``, the legacy {user, bot} turns beside the
    prompt) is the same conversation as those turns given as messages: same tokens, same answer."""
    history = [{"user": "Name a colour.", "bot": "Blue."}]
    r = Generation.call(model="qwen-plus", prompt="Another?", history=history, api_key=sdk, **SAMPLING)
    assert r.status_code == 200, r
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]
    m = Generation.call(model="qwen-plus", messages=messages, result_format="text", api_key=sdk, **SAMPLING)
    assert m.status_code == 200, m
    assert r.usage.input_tokens == m.usage.input_tokens and r.output.text == m.output.text
    alone = Generation.call(model="qwen-plus", prompt="Another?", api_key=sdk, **SAMPLING)
    assert alone.usage.input_tokens < r.usage.input_tokens
    # A malformed turn, or history beside messages, is a 400 naming it.
    bad = post(server, TEXT_URL, {"model": "qwen-plus", "input": {"prompt": "hi", "history": [{"user": 1}]}})
    assert bad.status_code == 400 and bad.json()["message"] and "input.history" in bad.text, bad.text
    both = post(server, TEXT_URL, {"model": "qwen-plus", "input": {"messages": messages, "history": history}})
    assert both.status_code == 400 and "input.history" in both.text, both.text


# -- thinking, tools, money -------------------------------------------------------------------------


def test_thinking_streams_reasoning_and_needs_increments(server: Server) -> None:
    body: dict[str, Any] = {
        "model": "qwen3-8b",
        "input": {"messages": MSG},
        "parameters": {"enable_thinking": True, "max_tokens": 4, "seed": 3, "temperature": 1.0},
    }
    r = post(server, TEXT_URL, body, sse=True)
    datas = [data_of(e) for e in events_of(r.text)]
    messages = [d["output"]["choices"][0]["message"] for d in datas]  # message form: the Qwen3 default
    assert all(set(m) == {"role", "content", "reasoning_content"} for m in messages)
    assert "".join(m["reasoning_content"] for m in messages)
    assert datas[-1]["usage"]["output_tokens_details"]["reasoning_tokens"] == 8  # max_reasoning
    body["parameters"]["incremental_output"] = False
    r = post(server, TEXT_URL, body, sse=True)
    [error] = events_of(r.text)
    assert (
        data_of(error)["message"]
        == 'The incremental_output parameter must be "true" when enable_thinking is true'
    )


def test_native_requests_are_metered_like_compatible_ones(server: Server) -> None:
    key = create_key(server.home, "native-metered", "--balance", "10")
    r = post(
        server, TEXT_URL, {"model": "qwen-plus", "input": {"prompt": "Hi"}, "parameters": SAMPLING}, key=key
    )
    assert r.status_code == 200, r.text
    assert "x-account-balance" in r.headers
    [row] = server.ledger(r.json()["request_id"])
    assert row["prompt_tokens"] == r.json()["usage"]["input_tokens"]
    assert row["status"] == "ok"


def test_key_limits_answer_in_native_form(server: Server) -> None:
    key = create_key(server.home, "native-rpm", "--rpm", "1")
    body = {"model": "qwen-plus", "input": {"prompt": "Hi"}, "parameters": SAMPLING}
    assert post(server, TEXT_URL, body, key=key).status_code == 200
    r = post(server, TEXT_URL, body, key=key)
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "Throttling.RateQuota"
    s = post(server, TEXT_URL, body, key=key, sse=True)
    [event] = events_of(s.text)
    assert event[:3] == ["id:1", "event:error", ":HTTP_STATUS/429"]


def test_a_body_that_is_not_json_is_illegal_input(server: Server) -> None:
    r = httpx.post(
        server.base_url + TEXT_URL,
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
        content=b"{not json",
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["code"] == "BadRequest.IllegalInput"
    assert r.json()["message"] == "The input parameter requires json format."


def test_unknown_native_path_is_a_native_404(server: Server) -> None:
    r = post(server, "/api/v1/services/aigc/nothing", {"model": "qwen-plus"})
    assert r.status_code == 404
    assert set(r.json()) == {"code", "message", "request_id"}


# -- translation (both protocols) --------------------------------------------------------------------


def _capture_translation() -> dict[str, Any]:
    body = json.loads(
        (CAPTURES / "single-generation-message-translation-nosse.request.body.json").read_text()
    )
    return body  # type: ignore[no-any-return]


def _prompt_tokens(text: str, options: dict[str, Any]) -> int:
    """What the tiny Qwen2.5 checkpoint's own template makes of the translation prompt: the count the
    server must report if the options really became the prompt."""
    from transformers import AutoTokenizer

    from qwen_gateway.service.translation import translation_prompt

    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": translation_prompt(text, options)}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return len(tok(rendered, add_special_tokens=False)["input_ids"])


def test_translation_options_build_the_prompt_in_both_protocols(server: Server, sdk: str) -> None:
    body = _capture_translation()
    body["parameters"].update(max_tokens=4, seed=1)
    options = body["parameters"]["translation_options"]
    text = body["input"]["messages"][0]["content"]
    expected = _prompt_tokens(text, options)
    plain = _prompt_tokens(text, {"source_lang": "Chinese", "target_lang": "English"})
    assert expected > plain  # terms, memory and domain are all in it

    r = post(server, TEXT_URL, body)
    assert r.status_code == 200, r.text
    output = r.json()["output"]
    assert (output["model_name"], output["finish_reason"]) == (
        "qwen-mt-plus",
        output["choices"][0]["finish_reason"],
    )
    assert r.json()["usage"]["input_tokens"] == expected

    compat = httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={
            "model": "qwen-mt-plus",
            "messages": body["input"]["messages"],
            "translation_options": options,
            "max_tokens": 4,
            "seed": 1,
        },
        timeout=300,
    )
    assert compat.status_code == 200, compat.text
    assert compat.json()["usage"]["prompt_tokens"] == expected
    assert compat.json()["choices"][0]["message"]["content"] == output["choices"][0]["message"]["content"]

    auto = Generation.call(
        model="qwen-mt-plus",
        messages=[{"role": "user", "content": text}],
        result_format="message",
        translation_options={"source_lang": "auto", "target_lang": "english"},
        max_tokens=4,
        api_key=sdk,
    )
    assert auto.status_code == 200, auto
    assert auto.usage.input_tokens == _prompt_tokens(text, {"source_lang": "auto", "target_lang": "English"})


@pytest.mark.parametrize(
    ("messages", "options", "model", "needle"),
    [
        (
            [{"role": "system", "content": "x"}, *MSG],
            {"source_lang": "auto", "target_lang": "English"},
            "qwen-mt-plus",
            "system message",
        ),
        (
            [*MSG, {"role": "assistant", "content": "2"}, *MSG],
            {"source_lang": "auto", "target_lang": "English"},
            "qwen-mt-plus",
            "exactly one",
        ),
        (
            MSG,
            {"source_lang": "auto", "target_lang": "Klingon"},
            "qwen-mt-plus",
            "translation_options.target_lang",
        ),
        (MSG, {"source_lang": "auto"}, "qwen-mt-plus", "translation_options.target_lang"),
        (MSG, {"target_lang": "English"}, "qwen-mt-plus", "translation_options.source_lang"),
        (
            MSG,
            {"source_lang": "auto", "target_lang": "English", "terms": [{"source": "a"}]},
            "qwen-mt-plus",
            "translation_options.terms.0",
        ),
        (
            MSG,
            {"source_lang": "auto", "target_lang": "English", "glossary": []},
            "qwen-mt-plus",
            "translation_options.glossary",
        ),
        (
            MSG,
            {"source_lang": "auto", "target_lang": "English"},
            "qwen-plus",
            "only supported by the translation models",
        ),
    ],
)
def test_translation_rules_refuse_in_both_protocols(
    server: Server, messages: list[dict[str, Any]], options: dict[str, Any], model: str, needle: str
) -> None:
    native = post(
        server,
        TEXT_URL,
        {"model": model, "input": {"messages": messages}, "parameters": {"translation_options": options}},
    )
    assert native.status_code == 400, native.text
    assert native.json()["code"] == "InvalidParameter" and needle in native.json()["message"]
    compat = httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": model, "messages": messages, "translation_options": options},
        timeout=60,
    )
    assert compat.status_code == 400, compat.text
    error = compat.json()["error"]
    assert needle in error["message"]
    assert error["param"].startswith("translation_options") or error["param"] == "messages"


# -- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_counts_the_text_and_is_free(server: Server, sdk: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")
    text = "代码改变世界, the code changes the world"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    before = len(server.ledger())
    r = post(
        server,
        "/api/v1/tokenizer",
        {"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": text}]}},
    )
    assert r.status_code == 200, r.text
    capture = json.loads((CAPTURES / "tokenization-nosse.response.body.txt").read_text().lstrip("\ufeff"))
    assert set(r.json()) == set(capture) and set(r.json()["output"]) == set(capture["output"])
    assert r.json()["output"]["token_ids"] == ids
    assert "".join(r.json()["output"]["tokens"]) == text
    assert r.json()["usage"] == {"input_tokens": len(ids)}
    assert len(server.ledger()) == before  # free: no ledger row

    sdk_result = dashscope.Tokenization.call(model="qwen-plus", prompt=text, api_key=sdk)
    assert sdk_result.status_code == 200, sdk_result
    assert sdk_result.output["token_ids"] == ids
    bad = post(server, "/api/v1/tokenizer", {"model": "qwen-plus", "input": {}}, key="sk-nope")
    assert (bad.status_code, bad.json()["code"]) == (401, "InvalidApiKey")


# -- compatible-mode parameters, native spelling -----------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


def test_named_tool_choice_in_native_form(server: Server) -> None:
    params = {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "seed": 2,
        "max_tokens": 40,
    }
    body = {"model": "qwen-plus", "input": {"messages": MSG}, "parameters": params}
    r = post(server, TEXT_URL, body)
    assert r.status_code == 200, r.text
    message = r.json()["output"]["choices"][0]["message"]  # tools answer in message form
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["type"] == "function" and call["id"]
    assert set(json.loads(call["function"]["arguments"])) == {"city"}

    s = post(server, TEXT_URL, {**body, "parameters": {**params, "incremental_output": True}}, sse=True)
    pieces = [data_of(e)["output"]["choices"][0]["message"] for e in events_of(s.text)]
    calls = [c for m in pieces for c in m.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == call["function"]["arguments"]
    assert data_of(events_of(s.text)[-1])["output"]["choices"][0]["finish_reason"] == "tool_calls"


def test_logprobs_in_native_form(server: Server) -> None:
    params = {"result_format": "message", "logprobs": True, "top_logprobs": 2, **SAMPLING}
    body = {"model": "qwen-plus", "input": {"messages": MSG}, "parameters": params}
    r = post(server, TEXT_URL, body).json()
    entries = r["output"]["choices"][0]["logprobs"]["content"]
    assert len(entries) == r["usage"]["output_tokens"]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    s = post(server, TEXT_URL, {**body, "parameters": {**params, "incremental_output": True}}, sse=True)
    streamed = [
        e for ev in events_of(s.text) for e in data_of(ev)["output"]["choices"][0]["logprobs"]["content"]
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]
